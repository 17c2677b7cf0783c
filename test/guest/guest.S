/*
 * Tiny test guest for qemu-migration-transport.
 *
 * A 512-byte boot sector: SeaBIOS loads it at 0x7c00 in real mode, it enables
 * A20, switches to flat 32-bit protected mode (no paging) and then loops
 * forever over the guest-physical range [START, END), incrementing the first
 * byte of every 4 KiB page. At start it sets all these counter bytes to 0 and
 * writes a banner line to the serial port (COM1, 0x3f8); after each complete
 * pass it writes PASSCHAR ('*').
 *
 * Build-time options (as --defsym):
 *   START  first byte of the range (page aligned, >= 1 MiB)      default 1 MiB
 *   END    end of the range, exclusive (page aligned, > START)   default 100 MiB
 *   DOWN   0: walk pages upward, 1: walk from the highest page down to START
 *   RDEND  0 (default): no read region. Otherwise the seed guest: a read
 *          region [END, RDEND) like the seed's video-streaming VM's kernel
 *          and read-only memory. At start the guest writes each of its pages'
 *          first dword with the page's address, once; then every pass, after
 *          the counter walk over the (small, hot) range, it reads that dword
 *          of every read page, writing '!' to the serial port for a page that
 *          does not hold its address. The read region is never written again:
 *          precopy moves it once, and postcopy at once has to fetch all of it.
 *
 * The loop uses no stack and no memory other than the range, so migration and
 * memory-comparison tests only see the counter bytes change.
 */

        .ifndef START
        .set START, 0x00100000
        .endif
        .ifndef END
        .set END, 0x06400000
        .endif
        .ifndef DOWN
        .set DOWN, 0
        .endif
        .ifndef RDEND
        .set RDEND, 0
        .endif

        .set PAGE, 4096
        .set COM1, 0x3f8
        .set PASSCHAR, '*'

        .code16
        .section .text
        .globl _start
_start:
        cli
        cld
        ljmp    $0, $real_start             /* normalise CS:IP to 0000:7cxx */
real_start:
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp

        /* Fast A20 gate (port 0x92), leave the reset bit clear. */
        inb     $0x92, %al
        orb     $0x02, %al
        andb    $0xfe, %al
        outb    %al, $0x92

        lgdtl   gdt_desc
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $pm32

        .code32
pm32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %fs
        movw    %ax, %gs
        movw    %ax, %ss
        movl    $0x7c00, %esp

        /*
         * SeaBIOS leaves data in high memory (e.g. around top-of-RAM minus
         * 16 MiB): clear every counter byte of the range once, so all
         * counters start from 0 and the invariant holds from the first pass.
         */
        movl    $START, %edi
0:      movb    $0, (%edi)
        addl    $PAGE, %edi
        cmpl    $END, %edi
        jb      0b

        .if RDEND
        movl    $END, %edi
4:      movl    %edi, (%edi)
        addl    $PAGE, %edi
        cmpl    $RDEND, %edi
        jb      4b
        .endif

        movl    $banner, %esi
1:      lodsb
        testb   %al, %al
        jz      outer
        call    putc
        jmp     1b

outer:
        .if DOWN
        movl    $(END - PAGE), %edi
2:      incb    (%edi)
        subl    $PAGE, %edi
        cmpl    $START, %edi
        jae     2b
        .else
        movl    $START, %edi
2:      incb    (%edi)
        addl    $PAGE, %edi
        cmpl    $END, %edi
        jb      2b
        .endif
        .if RDEND
        movl    $END, %edi
5:      cmpl    %edi, (%edi)
        je      6f
        movb    $'!', %al
        call    putc
6:      addl    $PAGE, %edi
        cmpl    $RDEND, %edi
        jb      5b
        .endif
        movb    $PASSCHAR, %al
        call    putc
        jmp     outer

/* Write %al to COM1 once the transmit holding register is empty. */
putc:
        movb    %al, %ah
        movw    $(COM1 + 5), %dx
3:      inb     %dx, %al
        testb   $0x20, %al
        jz      3b
        movw    $COM1, %dx
        movb    %ah, %al
        outb    %al, %dx
        ret

banner:
        .asciz  "\r\nQMT-GUEST\r\n"

        .p2align 3
gdt:
        .quad   0x0000000000000000          /* null */
        .quad   0x00cf9a000000ffff          /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad   0x00cf92000000ffff          /* 0x10: data, base 0, 4 GiB */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .org    510
        .byte   0x55, 0xaa
