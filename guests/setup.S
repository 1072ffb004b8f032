/*
 * bzImage setup area: the first (SETUP_SECTS + 1) * 512 bytes of the bzImage.
 *
 * Holds the Linux boot protocol setup_header at 0x1f1, and real-mode code for loaders that run
 * the setup code (QEMU's linuxboot option ROM, qboot, ...): it fills the E820 table of the zero
 * page through BIOS INT 15h/E820, switches to 32-bit protected mode and jumps to code32_start
 * with esi = boot_params, exactly as Linux's setup code does. The zero page is this setup area
 * itself (boot_params is 4 KiB; the code lives above it).
 *
 * Loaders that enter at the 64-bit entry point (linux-loader based VMMs) only read the header.
 * syssize (0x1f4) and init_size (0x260) are patched by build.rs.
 */
#define SETUP_SECTS 15			/* setup area = 16 * 512 = 8 KiB */
#define STACK_TOP   (16 * 512)

	.section .setup, "ax"
	.code16
	.globl _setup_start
_setup_start:
	.org	0x1f1
	.byte	SETUP_SECTS		/* setup_sects */
	.word	0			/* root_flags */
	.long	0			/* syssize (patched) */
	.word	0			/* ram_size */
	.word	0xffff			/* vid_mode: normal */
	.word	0			/* root_dev */
	.word	0xaa55			/* boot_flag */
	.org	0x200
	jmp	start_of_setup		/* jump (2 bytes) */
	.org	0x202
	.ascii	"HdrS"			/* header */
	.word	0x020f			/* version 2.15 */
	.long	0			/* realmode_swtch */
	.word	0			/* start_sys_seg */
	.word	0			/* kernel_version */
	.byte	0			/* type_of_loader */
	.byte	0x01			/* loadflags: LOADED_HIGH */
	.word	0x8000			/* setup_move_size */
code32_start:
	.long	0x100000		/* code32_start */
	.long	0			/* ramdisk_image */
	.long	0			/* ramdisk_size */
	.long	0			/* bootsect_kludge */
	.word	0			/* heap_end_ptr */
	.byte	0			/* ext_loader_ver */
	.byte	0			/* ext_loader_type */
	.long	0			/* cmd_line_ptr */
	.long	0x7fffffff		/* initrd_addr_max */
	.long	0x200000		/* kernel_alignment */
	.byte	0			/* relocatable_kernel */
	.byte	21			/* min_alignment (log2) */
	.word	0x0001			/* xloadflags: XLF_KERNEL_64 */
	.long	4095			/* cmdline_size */
	.long	0			/* hardware_subarch */
	.quad	0			/* hardware_subarch_data */
	.long	0			/* payload_offset */
	.long	0			/* payload_length */
	.quad	0			/* setup_data */
	.quad	0x100000		/* pref_address */
	.long	0			/* init_size (patched) */
	.long	0			/* handover_offset */
	.long	0			/* kernel_info_offset */
	.org	0x26c
start_of_setup:
	jmp	real_start

	/* boot_params occupies 0x000-0xfff; code, GDT and stack live above it */
	.org	0x1000
real_start:
	cli
	cld
	/* make CS equal to DS (the loader enters at CS = DS + 0x20, IP = 0) */
	pushw	%ds
	pushw	$1f
	lretw
1:	mov	%ds, %ax
	mov	%ax, %es
	mov	%ax, %ss
	mov	$STACK_TOP, %sp

	/* E820 memory map into boot_params.e820_table (0x2d0), count at 0x1e8 */
	movb	$0, 0x1e8
	xor	%ebx, %ebx
	mov	$0x2d0, %di
2:	mov	$0xe820, %eax
	mov	$20, %ecx
	mov	$0x534d4150, %edx	/* "SMAP" */
	int	$0x15
	jc	3f
	cmp	$0x534d4150, %eax
	jne	3f
	incb	0x1e8
	add	$20, %di
	cmpb	$128, 0x1e8
	jae	3f
	test	%ebx, %ebx
	jnz	2b
3:
	cli
	/* fast A20 gate (bit 1 of port 0x92; never set bit 0, which resets) */
	inb	$0x92, %al
	or	$2, %al
	and	$0xfe, %al
	outb	%al, $0x92

	/* esi = linear address of boot_params (this setup area) */
	xor	%esi, %esi
	mov	%ds, %si
	shl	$4, %esi
	mov	%esi, %eax
	add	$gdt, %eax
	mov	%eax, gdt_ptr + 2
	lgdtl	gdt_ptr
	mov	code32_start, %eax
	mov	%eax, far_ptr
	movw	$0x08, far_ptr + 4

	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	*far_ptr

	.balign 8
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: 32-bit code, flat */
	.quad	0x00af9a000000ffff	/* 0x10: 64-bit code */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
gdt_end:
gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	0
far_ptr:
	.long	0
	.word	0

	.org	STACK_TOP - 1
	.byte	0

	.section .note.GNU-stack, "", @progbits
