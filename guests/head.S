/*
 * Ferrovisor test guest: entry points, long-mode switch, AP trampoline, interrupt stubs.
 *
 * Entry points (all in one image linked at 1 MiB, physical = virtual):
 *   startup_32  (0x100000)  Linux 32-bit boot protocol entry (code32_start), esi = boot_params.
 *                           Reached from the real-mode setup code in the bzImage setup area.
 *   startup_64  (0x100200)  Linux 64-bit boot protocol entry, rsi = boot_params, paging on.
 *   pvh_start32             Xen PVH entry (ELF note XEN_ELFNOTE_PHYS32_ENTRY), ebx = hvm_start_info,
 *                           32-bit protected mode, paging off.
 */
#include "ftg.h"

#define MSR_EFER 0xc0000080

/* ------------------------------------------------------------------ */
	.section .head32, "ax"
	.code32
	.globl startup_32
startup_32:
	cli
	cld
	lgdt	%cs:gdt_ptr
	ljmp	$FTG_CS32, $1f
1:	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	$FTG_ENTRY_BZIMAGE32, %ebp
	jmp	enter_long_mode32

/*
 * Common 32-bit path into long mode. In: esi = boot info pointer, ebp = entry kind,
 * flat 32-bit segments, paging off. Zeroes .bss, builds an identity map of 0-4 GiB with
 * 2 MiB pages, enables PAE, EFER.LME and paging and jumps to 64-bit code.
 */
enter_long_mode32:
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	shr	$2, %ecx		/* bss is 16-byte aligned: clear it 4 bytes at a time, */
	xor	%eax, %eax		/* since under an instruction emulator (PVM) every */
	rep stosl			/* iteration costs as much as an instruction */

	mov	$ftg_pdpt, %eax
	or	$3, %eax
	mov	%eax, ftg_pml4
	mov	$ftg_pd, %eax
	or	$3, %eax
	mov	$ftg_pdpt, %edi
	mov	$4, %ecx
2:	mov	%eax, (%edi)
	add	$0x1000, %eax
	add	$8, %edi
	dec	%ecx
	jnz	2b

	xor	%ecx, %ecx
	mov	$ftg_pd, %edi
3:	mov	%ecx, %eax
	shl	$21, %eax
	or	$0x83, %eax		/* present, writable, 2 MiB */
	cmp	$1536, %ecx
	jb	4f
	or	$0x18, %eax		/* 3-4 GiB (MMIO hole): PCD | PWT */
4:	mov	%eax, (%edi,%ecx,8)
	movl	$0, 4(%edi,%ecx,8)	/* the directories are not cleared at entry */
	inc	%ecx
	cmp	$2048, %ecx
	jb	3b

	mov	%cr4, %eax
	or	$0x20, %eax		/* PAE */
	mov	%eax, %cr4
	mov	$ftg_pml4, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$0x100, %eax		/* LME */
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax	/* PG | PE */
	mov	%eax, %cr0
	ljmp	$FTG_CS64, $long_entry32

/* ------------------------------------------------------------------ */
	.section .head64, "ax"
	.code64
	.globl startup_64
startup_64:
	cli
	cld
	mov	$boot_stack_top, %esp
	lgdt	gdt_ptr(%rip)
	lea	1f(%rip), %rax
	push	$FTG_CS64
	push	%rax
	lretq
1:	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	%rsi, %rdx
	mov	$__bss_start, %edi
	mov	$__bss_end, %ecx
	sub	%edi, %ecx
	shr	$3, %ecx		/* bss is 16-byte aligned: clear it 8 bytes at a time, */
	xor	%eax, %eax		/* since under an instruction emulator (PVM) every */
	rep stosq			/* iteration costs as much as an instruction */
	mov	$boot_stack_top, %esp
	mov	%rdx, %rsi
	mov	$FTG_ENTRY_BZIMAGE64, %edi
	call	ftg_main
	jmp	ftg_hang

/* ------------------------------------------------------------------ */
	.text
	.code64
long_entry32:
	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	$boot_stack_top, %esp
	mov	%ebp, %edi
	mov	%esi, %esi		/* zero-extend */
	call	ftg_main
	.globl ftg_hang
ftg_hang:
	cli
	hlt
	jmp	ftg_hang

	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	lgdt	%cs:gdt_ptr
	ljmp	$FTG_CS32, $1f
1:	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	%ebx, %esi
	mov	$FTG_ENTRY_PVH, %ebp
	jmp	enter_long_mode32

/* ------------------------------------------------------------------ */
/* 64-bit entry of the application processors (from the trampoline). */
	.code64
ap_entry64:
	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%eax, %fs
	mov	%eax, %gs
	mov	$1, %eax
	lock xadd %eax, ap_stack_next
	cmp	$FTG_MAX_APS, %eax
	jae	ftg_hang
	mov	%eax, %edi
	inc	%eax
	imul	$FTG_AP_STACK_SIZE, %eax, %eax
	add	$ap_stacks, %eax
	mov	%eax, %esp
	call	ftg_ap_main
	jmp	ftg_hang

/*
 * AP trampoline, copied to FTG_TRAMP_BASE and started by SIPI in real mode at
 * CS = FTG_TRAMP_BASE >> 4, IP = 0. Position-dependent only on FTG_TRAMP_BASE.
 */
	.section .tramp, "ax"
	.code16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	mov	%cs, %ax
	mov	%ax, %ds
	lgdtl	(tr_gdt_ptr - ap_tramp_start)
	mov	%cr0, %eax
	or	$1, %eax
	mov	%eax, %cr0
	ljmpl	$FTG_CS32, $(FTG_TRAMP_BASE + tr32 - ap_tramp_start)
	.code32
tr32:
	mov	$FTG_DS, %eax
	mov	%eax, %ds
	mov	%eax, %es
	mov	%eax, %ss
	mov	%cr4, %eax
	or	$0x20, %eax
	mov	%eax, %cr4
	mov	ftg_ap_cr3, %eax
	mov	%eax, %cr3
	mov	$MSR_EFER, %ecx
	rdmsr
	or	$0x100, %eax
	wrmsr
	mov	%cr0, %eax
	or	$0x80000001, %eax
	mov	%eax, %cr0
	ljmp	$FTG_CS64, $ap_entry64
	.balign 8
tr_gdt_ptr:
	.word	gdt_end - gdt - 1
	.long	gdt
ap_tramp_end:

/* ------------------------------------------------------------------ */
/* Interrupt and exception stubs. */
	.text
	.code64
.macro EXC n, err
exc_\n:
	.if \err == 0
	push	$0
	.endif
	push	$\n
	jmp	exc_common
.endm
	EXC 0,0
	EXC 1,0
	EXC 2,0
	EXC 3,0
	EXC 4,0
	EXC 5,0
	EXC 6,0
	EXC 7,0
	EXC 8,1
	EXC 9,0
	EXC 10,1
	EXC 11,1
	EXC 12,1
	EXC 13,1
	EXC 14,1
	EXC 15,0
	EXC 16,0
	EXC 17,1
	EXC 18,0
	EXC 19,0
	EXC 20,0
	EXC 21,1
	EXC 22,0
	EXC 23,0
	EXC 24,0
	EXC 25,0
	EXC 26,0
	EXC 27,0
	EXC 28,0
	EXC 29,1
	EXC 30,1
	EXC 31,0

exc_common:
	/* stack: vector, error code, rip, cs, rflags, rsp, ss */
	mov	%rsp, %rdi
	and	$-16, %rsp
	call	ftg_exception
	jmp	ftg_hang

	.globl ftg_timer_isr
ftg_timer_isr:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	call	ftg_timer_irq
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	iretq

	.globl ftg_ignore_isr
ftg_ignore_isr:
	iretq

	.section .rodata
	.balign 8
	.globl ftg_exc_stubs
ftg_exc_stubs:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad	exc_\n
	.endr

/* ------------------------------------------------------------------ */
	.data
	.balign 16
	.globl gdt
gdt:
	.quad	0
	.quad	0x00cf9a000000ffff	/* 0x08: 32-bit code, flat */
	.quad	0x00af9a000000ffff	/* 0x10: 64-bit code */
	.quad	0x00cf92000000ffff	/* 0x18: data, flat */
gdt_end:
	.balign 8
	.word	0, 0, 0
gdt_ptr:				/* usable by lgdt in 32- and 64-bit mode */
	.word	gdt_end - gdt - 1
	.quad	gdt

	.globl ftg_ap_cr3
ftg_ap_cr3:
	.long	0
	.globl ap_stack_next
ap_stack_next:
	.long	0

/* ------------------------------------------------------------------ */
	.section .bss
	.balign 4096
	.globl ftg_pml4, ftg_pdpt, ftg_pd
ftg_pml4:	.skip 4096
ftg_pdpt:	.skip 4096

/* Stacks and page directories are never read before they are written, so they live outside
 * .bss and are not cleared at entry: under an instruction emulator (PVM) clearing them would
 * cost more than the rest of a quick boot. */
	.section .noclear, "aw", @nobits
	.balign 4096
ftg_pd:		.skip 4 * 4096
	.balign 16
boot_stack:	.skip FTG_BOOT_STACK_SIZE
boot_stack_top:
	.balign 16
ap_stacks:	.skip FTG_MAX_APS * FTG_AP_STACK_SIZE

/* ------------------------------------------------------------------ */
/* PVH entry point note (read by linux-loader's and QEMU's ELF loaders). */
	.section .note.Xen, "a"
	.balign 4
	.long	4			/* namesz */
	.long	8			/* descsz */
	.long	18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign 4
	.quad	pvh_start32

	.section .note.GNU-stack, "", @progbits
