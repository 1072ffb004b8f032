/* Ferrovisor test guest (ftg): constants shared by the C and assembly sources. */
#ifndef FTG_H
#define FTG_H

#define FTG_LOAD_ADDR      0x100000   /* physical = virtual load address of the image */
#define FTG_TRAMP_BASE     0x70000    /* AP real-mode trampoline (4 KiB aligned, < 1 MiB) */
#define FTG_TRAMP_VECTOR   (FTG_TRAMP_BASE >> 12)
#define FTG_MAX_APS        64
#define FTG_AP_STACK_SIZE  1024
#define FTG_BOOT_STACK_SIZE 16384

/* GDT selectors (same layout as Ferrovisor's boot GDT for 0x10/0x18) */
#define FTG_CS32 0x08
#define FTG_CS64 0x10
#define FTG_DS   0x18

/* how the guest was entered */
#define FTG_ENTRY_BZIMAGE64 0   /* Linux boot protocol, 64-bit entry at load + 0x200 */
#define FTG_ENTRY_BZIMAGE32 1   /* Linux boot protocol, 32-bit entry at code32_start (via real-mode setup) */
#define FTG_ENTRY_PVH       2   /* Xen PVH, 32-bit entry from the ELF note */

#define FTG_TIMER_VECTOR    0x40
#define FTG_SPURIOUS_VECTOR 0xff

#endif
