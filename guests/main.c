/*
 * Ferrovisor test guest (ftg): a freestanding x86-64 program that checks what the VMM gave it
 * (command line, memory map, initrd, ACPI tables, CPUs, kvm-clock, LAPIC timer) and prints the
 * results on COM1, one "ftg: " line each, then powers off / resets / ... as asked.
 * See README.md in this directory for the output protocol.
 */
#include <stdarg.h>
#include <stdint.h>
#include "ftg.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int64_t i64;

/* unaligned, aliasing-safe loads */
typedef u16 __attribute__((aligned(1), may_alias)) u16u;
typedef u32 __attribute__((aligned(1), may_alias)) u32u;
typedef u64 __attribute__((aligned(1), may_alias)) u64u;
static inline u8 rd8(u64 a) { return *(const volatile u8 *)(uintptr_t)a; }
static inline u16 rd16(u64 a) { return *(const u16u *)(uintptr_t)a; }
static inline u32 rd32(u64 a) { return *(const u32u *)(uintptr_t)a; }
static inline u64 rd64(u64 a) { return *(const u64u *)(uintptr_t)a; }

/* ------------------------------------------------------------------ libc bits */
void *memset(void *d, int c, unsigned long n);
void *memcpy(void *d, const void *s, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);

void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p < *q ? -1 : 1;
	return 0;
}

/* ------------------------------------------------------------------ CPU helpers */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u16 inw(u16 port)
{
	u16 v;
	__asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) : : "memory");
	return ((u64)hi << 32) | lo;
}
static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 read_cr3(void)
{
	u64 v;
	__asm__ volatile("mov %%cr3, %0" : "=r"(v));
	return v;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
#define barrier() __asm__ volatile("" ::: "memory")

static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)(uintptr_t)a = v; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)(uintptr_t)a; }

extern void ftg_hang(void) __attribute__((noreturn));

static void __attribute__((noreturn)) halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* ------------------------------------------------------------------ serial console */
#define COM1 0x3f8

static void serial_init(void)
{
	outb(COM1 + 1, 0x00);	/* no interrupts */
	outb(COM1 + 3, 0x80);	/* DLAB */
	outb(COM1 + 0, 0x01);	/* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);	/* 8N1 */
	outb(COM1 + 2, 0x07);	/* FIFO on, cleared */
	outb(COM1 + 4, 0x03);	/* DTR | RTS */
}

static void putc_raw(char c)
{
	unsigned spins = 0;
	while (!(inb(COM1 + 5) & 0x20) && ++spins < 1000000)
		cpu_relax();
	outb(COM1, (u8)c);
}

static void putch(char c)
{
	if (c == '\n')
		putc_raw('\r');
	putc_raw(c);
}

static void puts_(const char *s)
{
	while (*s)
		putch(*s++);
}

static void put_u(u64 v, unsigned base, int width)
{
	char buf[24];
	int i = 0;
	do {
		unsigned d = (unsigned)(v % base);
		buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (i < width)
		buf[i++] = '0';
	while (i)
		putch(buf[--i]);
}

/*
 * Minimal printf. Integer conversions all take u64 arguments:
 * %u decimal, %x hex, %X 16-digit hex, %s string, %c char, %% percent.
 */
static void pr(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putch(*fmt);
			continue;
		}
		switch (*++fmt) {
		case 'u': put_u(va_arg(ap, u64), 10, 0); break;
		case 'x': put_u(va_arg(ap, u64), 16, 0); break;
		case 'X': put_u(va_arg(ap, u64), 16, 16); break;
		case 's': puts_(va_arg(ap, const char *)); break;
		case 'c': putch((char)va_arg(ap, int)); break;
		case '%': putch('%'); break;
		case 0: fmt--; break;
		default: putch('%'); putch(*fmt); break;
		}
	}
	va_end(ap);
}

/* ------------------------------------------------------------------ time */
struct pvclock_vcpu_time_info {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	int8_t tsc_shift;
	u8 flags;
	u8 pad[2];
} __attribute__((packed));

static volatile struct pvclock_vcpu_time_info pvti __attribute__((aligned(32)));
static int have_kvmclock;
static u64 tsc_khz = 2000000;	/* guess when nothing better is known */

static u64 kvmclock_ns(void)
{
	u32 v;
	u64 tsc, ts, st, delta;
	u32 mul;
	int8_t shift;
	do {
		v = pvti.version;
		barrier();
		tsc = rdtsc();
		ts = pvti.tsc_timestamp;
		st = pvti.system_time;
		mul = pvti.tsc_to_system_mul;
		shift = pvti.tsc_shift;
		barrier();
	} while ((v & 1) || v != pvti.version);
	delta = tsc - ts;
	if (shift < 0)
		delta >>= -shift;
	else
		delta <<= shift;
	return st + (u64)(((unsigned __int128)delta * mul) >> 32);
}

static u64 now_ns(void)
{
	if (have_kvmclock)
		return kvmclock_ns();
	return rdtsc() / tsc_khz * 1000000 + (rdtsc() % tsc_khz) * 1000000 / tsc_khz;
}

static void delay_us(u64 us)
{
	u64 end = now_ns() + us * 1000;
	while (now_ns() < end)
		cpu_relax();
}

static int kvm_signature(void)
{
	u32 a, b, c, d;
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	return b == 0x4b4d564b && c == 0x564b4d56 && d == 0x0000004d; /* "KVMKVMKVM\0\0\0" */
}

static void time_init(void)
{
	u32 a, b, c, d, max;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c)
			tsc_khz = (u64)c * b / a / 1000;
	}
	if (max >= 0x16 && tsc_khz == 2000000) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a & 0xffff)
			tsc_khz = (u64)(a & 0xffff) * 1000;
	}
	if (kvm_signature()) {
		cpuid(0x40000001, 0, &a, &b, &c, &d);
		if (a & (1u << 3)) {
			wrmsr(0x4b564d01, (u64)(uintptr_t)&pvti | 1);
			have_kvmclock = 1;
		}
	}
}

/* ------------------------------------------------------------------ boot information */
struct e820 {
	u64 addr, size;
	u32 type;
};

static char cmdline[4096];
static struct e820 e820[128];
static unsigned n_e820;
static u64 initrd_addr, initrd_size;
static int have_initrd;
static u64 rsdp_hint;
static int entry_kind;
static int pvh_bad_magic;

static void copy_cmdline(u64 pa)
{
	unsigned i = 0;
	if (pa)
		for (; i < sizeof(cmdline) - 1 && rd8(pa + i); i++)
			cmdline[i] = (char)rd8(pa + i);
	cmdline[i] = 0;
}

static void read_boot_params(u64 bp)
{
	unsigned n = rd8(bp + 0x1e8);
	if (n > 128)
		n = 128;
	for (unsigned i = 0; i < n; i++) {
		u64 e = bp + 0x2d0 + 20 * i;
		e820[i].addr = rd64(e);
		e820[i].size = rd64(e + 8);
		e820[i].type = rd32(e + 16);
	}
	n_e820 = n;
	copy_cmdline(rd32(bp + 0x228) | ((u64)rd32(bp + 0x0c8) << 32));
	initrd_addr = rd32(bp + 0x218) | ((u64)rd32(bp + 0x0c0) << 32);
	initrd_size = rd32(bp + 0x21c) | ((u64)rd32(bp + 0x0c4) << 32);
	have_initrd = initrd_addr && initrd_size;
	rsdp_hint = rd64(bp + 0x070);
}

static void read_pvh_start_info(u64 si)
{
	if (rd32(si) != 0x336ec578) {
		pvh_bad_magic = 1;
		return;
	}
	u32 version = rd32(si + 4);
	u32 nr_modules = rd32(si + 12);
	u64 modlist = rd64(si + 16);
	copy_cmdline(rd64(si + 24));
	rsdp_hint = rd64(si + 32);
	if (version >= 1) {
		u64 mm = rd64(si + 40);
		u32 n = rd32(si + 48);
		if (n > 128)
			n = 128;
		for (u32 i = 0; mm && i < n; i++) {
			e820[i].addr = rd64(mm + 24 * i);
			e820[i].size = rd64(mm + 24 * i + 8);
			e820[i].type = rd32(mm + 24 * i + 16);
		}
		n_e820 = mm ? n : 0;
	}
	if (nr_modules && modlist) {
		initrd_addr = rd64(modlist);
		initrd_size = rd64(modlist + 8);
		have_initrd = initrd_size != 0;
	}
}

/* ------------------------------------------------------------------ command line options */
static const char *opt(const char *key)
{
	unsigned kl = 0;
	while (key[kl])
		kl++;
	for (const char *p = cmdline; *p;) {
		while (*p == ' ')
			p++;
		if (!memcmp(p, "ftg.", 4) && !memcmp(p + 4, key, kl) && p[4 + kl] == '=')
			return p + 5 + kl;
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

static int opt_is(const char *key, const char *val, int dflt)
{
	const char *v = opt(key);
	if (!v)
		return dflt;
	unsigned i = 0;
	for (; val[i]; i++)
		if (v[i] != val[i])
			return 0;
	return v[i] == 0 || v[i] == ' ';
}

static u64 opt_num(const char *key, u64 dflt)
{
	const char *v = opt(key);
	if (!v || *v < '0' || *v > '9')
		return dflt;
	u64 n = 0;
	while (*v >= '0' && *v <= '9')
		n = n * 10 + (u64)(*v++ - '0');
	return n;
}

static void opt_word(const char *key, char *out, unsigned cap, const char *dflt)
{
	const char *v = opt(key);
	unsigned i = 0;
	if (!v)
		v = dflt;
	while (v[i] && v[i] != ' ' && i + 1 < cap) {
		out[i] = v[i];
		i++;
	}
	out[i] = 0;
}

/* ------------------------------------------------------------------ ACPI */
static u64 rsdp_addr;
static u64 fadt_addr;
static u64 madt_addr;
static u64 dsdt_addr;
static unsigned madt_cpus;
static u32 madt_apic_ids[256];
static int hw_reduced;
static int acpi_quiet;

static int checksum_ok(u64 a, u32 len)
{
	u8 s = 0;
	for (u32 i = 0; i < len; i++)
		s = (u8)(s + rd8(a + i));
	return s == 0;
}

static void bad_checksum(const char *sig4)
{
	if (!acpi_quiet)
		pr("ftg: acpi bad checksum %c%c%c%c\n", sig4[0], sig4[1], sig4[2], sig4[3]);
}

static u64 find_rsdp(void)
{
	if (rsdp_hint && !memcmp((const void *)(uintptr_t)rsdp_hint, "RSD PTR ", 8))
		return rsdp_hint;
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((const void *)(uintptr_t)a, "RSD PTR ", 8) && checksum_ok(a, 20))
			return a;
	return 0;
}

/* table at a: verify its checksum, reject unmapped/absurd addresses */
static int table_ok(u64 a)
{
	if (!a || a >= 0x100000000ull || rd32(a + 4) < 36 || rd32(a + 4) > 0x1000000)
		return 0;
	if (!checksum_ok(a, rd32(a + 4)))
		bad_checksum((const char *)(uintptr_t)a);
	return 1;
}

static void parse_madt(u64 m)
{
	u32 len = rd32(m + 4);
	for (u32 off = 44; off + 2 <= len;) {
		u8 type = rd8(m + off), l = rd8(m + off + 1);
		if (l < 2)
			break;
		if (type == 0 && l >= 8 && (rd32(m + off + 4) & 1)) {
			if (madt_cpus < 256)
				madt_apic_ids[madt_cpus] = rd8(m + off + 3);
			madt_cpus++;
		} else if (type == 9 && l >= 16 && (rd32(m + off + 8) & 1)) {
			if (madt_cpus < 256)
				madt_apic_ids[madt_cpus] = rd32(m + off + 4);
			madt_cpus++;
		}
		off += l;
	}
}

static void acpi_scan(void)
{
	rsdp_addr = find_rsdp();
	if (!rsdp_addr)
		return;
	u64 r = rsdp_addr;
	u8 rev = rd8(r + 15);
	if (!checksum_ok(r, 20) || (rev >= 2 && !checksum_ok(r, rd32(r + 20))))
		bad_checksum("RSDP");
	u64 root = 0;
	int xsdt = 0;
	if (rev >= 2 && rd64(r + 24)) {
		root = rd64(r + 24);
		xsdt = 1;
	} else {
		root = rd32(r + 16);
	}
	if (!table_ok(root))
		return;
	u32 len = rd32(root + 4);
	u32 n = (len - 36) / (xsdt ? 8 : 4);
	for (u32 i = 0; i < n; i++) {
		u64 t = xsdt ? rd64(root + 36 + 8 * i) : rd32(root + 36 + 4 * i);
		if (!table_ok(t))
			continue;
		if (!memcmp((const void *)(uintptr_t)t, "APIC", 4) && !madt_addr)
			madt_addr = t;
		else if (!memcmp((const void *)(uintptr_t)t, "FACP", 4) && !fadt_addr)
			fadt_addr = t;
	}
	if (madt_addr)
		parse_madt(madt_addr);
	if (fadt_addr) {
		u32 flen = rd32(fadt_addr + 4);
		if (flen >= 116)
			hw_reduced = (rd32(fadt_addr + 112) >> 20) & 1;
		u64 d = 0;
		if (flen >= 148)
			d = rd64(fadt_addr + 140);
		if (!d)
			d = rd32(fadt_addr + 40);
		if (table_ok(d))
			dsdt_addr = d;
	}
}

/* SLP_TYP for S5 from the DSDT's \_S5_ package; -1 if not found */
static int s5_slp_typ(void)
{
	if (!dsdt_addr)
		return -1;
	u32 len = rd32(dsdt_addr + 4);
	for (u32 i = 36; i + 8 < len; i++) {
		u64 p = dsdt_addr + i;
		if (memcmp((const void *)(uintptr_t)p, "_S5_", 4))
			continue;
		p += 4;
		if (rd8(p) != 0x12)	/* PackageOp */
			continue;
		p++;
		p += 1 + (rd8(p) >> 6);	/* PkgLength */
		p++;			/* NumElements */
		u8 op = rd8(p);
		if (op == 0x0a)		/* BytePrefix */
			return rd8(p + 1);
		if (op == 0x00 || op == 0x01)	/* ZeroOp / OneOp */
			return op;
		return op;		/* raw byte */
	}
	return -1;
}

/* Generic Address Structure write, 8-bit access */
static void gas_write8(u64 gas, u8 v)
{
	u8 space = rd8(gas);
	u64 addr = rd64(gas + 4);
	if (!addr)
		return;
	if (space == 1)
		outb((u16)addr, v);
	else if (space == 0)
		*(volatile u8 *)(uintptr_t)addr = v;
}

static void acpi_poweroff(void)
{
	if (!fadt_addr)
		return;
	int typ = s5_slp_typ();
	u32 flen = rd32(fadt_addr + 4);
	if (hw_reduced) {
		if (typ < 0)
			typ = 5;
		if (flen >= 256)
			gas_write8(fadt_addr + 244, (u8)(((typ & 7) << 2) | 0x20));
		return;
	}
	if (typ < 0)
		typ = 0;
	u32 pm1a = rd32(fadt_addr + 64);
	if (!pm1a && flen >= 184 && rd8(fadt_addr + 172) == 1)
		pm1a = (u32)rd64(fadt_addr + 176);
	if (!pm1a)
		return;
	u32 smi_cmd = rd32(fadt_addr + 48);
	u8 acpi_enable = rd8(fadt_addr + 52);
	if (smi_cmd && acpi_enable && !(inw((u16)pm1a) & 1)) {
		outb((u16)smi_cmd, acpi_enable);
		for (int i = 0; i < 3000 && !(inw((u16)pm1a) & 1); i++)
			delay_us(1000);
	}
	u16 v = inw((u16)pm1a);
	v = (u16)((v & ~(7u << 10)) | ((u32)(typ & 7) << 10) | (1u << 13));
	outw((u16)pm1a, v);
}

static void acpi_reset(void)
{
	if (!fadt_addr || rd32(fadt_addr + 4) < 129)
		return;
	if (!((rd32(fadt_addr + 112) >> 10) & 1))
		return;
	gas_write8(fadt_addr + 116, rd8(fadt_addr + 128));
}

/* ------------------------------------------------------------------ interrupts */
struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, zero;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(16)));
extern const u64 ftg_exc_stubs[32];
extern void ftg_timer_isr(void);
extern void ftg_ignore_isr(void);

static void set_gate(int v, void (*h)(void))
{
	u64 a = (u64)(uintptr_t)h;
	idt[v].off0 = (u16)a;
	idt[v].sel = FTG_CS64;
	idt[v].ist = 0;
	idt[v].type = 0x8e;
	idt[v].off1 = (u16)(a >> 16);
	idt[v].off2 = (u32)(a >> 32);
	idt[v].zero = 0;
}

static void load_idt(void *base, u16 limit)
{
	struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) p = { limit, (u64)(uintptr_t)base };
	__asm__ volatile("lidt %0" : : "m"(p) : "memory");
}

static void idt_init(void)
{
	for (int v = 0; v < 256; v++)
		set_gate(v, v < 32 ? (void (*)(void))(uintptr_t)ftg_exc_stubs[v] : ftg_ignore_isr);
	set_gate(FTG_TIMER_VECTOR, ftg_timer_isr);
	load_idt(idt, sizeof(idt) - 1);
}

void ftg_exception(const u64 *frame);
void ftg_exception(const u64 *frame)
{
	pr("ftg: exception vector=%u error=0x%x rip=0x%x\n", frame[0], frame[1], frame[2]);
	halt_forever();
}

/* remap the 8259 PICs away from the exception vectors and mask them all */
static void pic_mask(void)
{
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

/* ------------------------------------------------------------------ local APIC */
static u64 lapic = 0xfee00000;
#define LAPIC_ID    0x020
#define LAPIC_EOI   0x0b0
#define LAPIC_SVR   0x0f0
#define LAPIC_ICRLO 0x300
#define LAPIC_ICRHI 0x310
#define LAPIC_LVTT  0x320
#define LAPIC_TICR  0x380
#define LAPIC_TCCR  0x390
#define LAPIC_TDCR  0x3e0

static volatile u32 timer_ticks;

void ftg_timer_irq(void);
void ftg_timer_irq(void)
{
	timer_ticks++;
	mmio_w32(lapic + LAPIC_EOI, 0);
}

static u32 cpuid_apic_id(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return b >> 24;
}

static void lapic_init(void)
{
	u64 base = rdmsr(0x1b);
	if (!(base & (1u << 11)))
		wrmsr(0x1b, base | (1u << 11));	/* global enable */
	lapic = base & 0xfffff000ull;
	if (!lapic)
		lapic = 0xfee00000;
	mmio_w32(lapic + 0x080, 0);			/* TPR */
	mmio_w32(lapic + LAPIC_SVR, 0x100 | FTG_SPURIOUS_VECTOR);
}

/* LAPIC periodic timer, vector FTG_TIMER_VECTOR, 1 ms at a 1 GHz APIC bus */
static void timer_start(void)
{
	mmio_w32(lapic + LAPIC_TDCR, 0x3);		/* divide by 16 */
	mmio_w32(lapic + LAPIC_LVTT, 0x20000 | FTG_TIMER_VECTOR); /* periodic */
	mmio_w32(lapic + LAPIC_TICR, 62500);
}

static void timer_stop(void)
{
	mmio_w32(lapic + LAPIC_LVTT, 0x10000 | FTG_TIMER_VECTOR); /* masked */
	mmio_w32(lapic + LAPIC_TICR, 0);
}

/* returns the number of ticks seen; *ok = reached 10 before the deadline */
static u32 timer_test(int *ok)
{
	timer_ticks = 0;
	timer_start();
	u64 deadline = now_ns() + 2000000000ull;
	__asm__ volatile("sti");
	while (timer_ticks < 10 && now_ns() < deadline) {
		/* once the periodic timer has fired, it will wake us from hlt */
		if (timer_ticks > 0)
			__asm__ volatile("hlt");
		else
			cpu_relax();
	}
	__asm__ volatile("cli");
	timer_stop();
	*ok = timer_ticks >= 10;
	return timer_ticks;
}

/*
 * Waits about `ms` milliseconds by now_ns() (kvm-clock, else TSC). With a working timer it
 * halts between timer ticks, so a guest paused (or snapshotted) mid-wait costs no CPU and
 * goes on when its clock passes the deadline; otherwise it spins.
 */
static void sleep_ms(u64 ms, int timer_ok)
{
	u64 end = now_ns() + ms * 1000000ull;
	if (!timer_ok) {
		while (now_ns() < end)
			cpu_relax();
		return;
	}
	timer_start();
	/* sti's interrupt shadow covers hlt: a tick pending since the check wakes it at once */
	while (now_ns() < end)
		__asm__ volatile("sti; hlt; cli" ::: "memory");
	timer_stop();
}

/* ------------------------------------------------------------------ SMP */
extern const u8 ap_tramp_start[], ap_tramp_end[];
extern volatile u32 ftg_ap_cr3;
static volatile u32 ap_online;
static volatile u32 ap_ids[FTG_MAX_APS];

void ftg_ap_main(u32 slot);
void ftg_ap_main(u32 slot)
{
	ap_ids[slot] = cpuid_apic_id() | 0x80000000u;
	__atomic_fetch_add(&ap_online, 1, __ATOMIC_SEQ_CST);
	halt_forever();
}

static void icr_send(u32 apic_id, u32 lo)
{
	mmio_w32(lapic + LAPIC_ICRHI, apic_id << 24);
	mmio_w32(lapic + LAPIC_ICRLO, lo);
	for (int i = 0; i < 100000 && (mmio_r32(lapic + LAPIC_ICRLO) & (1u << 12)); i++)
		cpu_relax();
}

/* start every enabled MADT processor other than the BSP; returns how many were kicked */
static u32 start_aps(u32 bsp_id)
{
	u32 n = 0;
	u32 want[FTG_MAX_APS];
	unsigned cpus = madt_cpus < 256 ? madt_cpus : 256;
	for (unsigned i = 0; i < cpus && n < FTG_MAX_APS; i++)
		if (madt_apic_ids[i] != bsp_id && madt_apic_ids[i] < 255)
			want[n++] = madt_apic_ids[i];
	if (!n)
		return 0;
	memcpy((void *)(uintptr_t)FTG_TRAMP_BASE, ap_tramp_start,
	       (unsigned long)(ap_tramp_end - ap_tramp_start));
	ftg_ap_cr3 = (u32)read_cr3();
	__asm__ volatile("" ::: "memory");
	for (u32 i = 0; i < n; i++)
		icr_send(want[i], 0x00004500);		/* INIT, assert */
	delay_us(10000);
	for (int round = 0; round < 2; round++) {
		for (u32 i = 0; i < n; i++)
			icr_send(want[i], 0x00004600 | FTG_TRAMP_VECTOR); /* STARTUP */
		delay_us(200);
	}
	u64 deadline = now_ns() + 5000000000ull;
	while (ap_online < n && now_ns() < deadline)
		cpu_relax();
	return n;
}

/* ------------------------------------------------------------------ keyboard */
/*
 * A VMM asks for a graceful shutdown by typing Ctrl-Alt-Del on the i8042's keyboard. Polled:
 * the keyboard interrupt stays off. With the controller's scancode translation on (the power-on
 * state), the codes are set 1: Ctrl 0x1d, Alt 0x38, Delete 0xe0 0x53, bit 7 set on release.
 */
static int kbd_ctrl, kbd_alt, kbd_extended;

static int ctrl_alt_del_typed(void)
{
	/* No controller (QEMU microvm): the port floats to 0xff, "output full" forever. At most
	 * a few bytes are read per call, so a missing or stuck controller cannot hang the count. */
	for (int n = 0; n < 16; n++) {
		u8 status = inb(0x64);
		if (status == 0xff || !(status & 1))
			break;
		u8 b = inb(0x60);
		if (b == 0xe0) {
			kbd_extended = 1;
			continue;
		}
		int down = !(b & 0x80), extended = kbd_extended;
		kbd_extended = 0;
		switch (b & 0x7f) {
		case 0x1d:
			kbd_ctrl = down;
			break;
		case 0x38:
			kbd_alt = down;
			break;
		case 0x53:
			if (extended && down && kbd_ctrl && kbd_alt)
				return 1;
			break;
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ main */
static u64 fnv1a64(u64 a, u64 n)
{
	u64 h = 0xcbf29ce484222325ull;
	for (u64 i = 0; i < n; i++) {
		h ^= rd8(a + i);
		h *= 0x100000001b3ull;
	}
	return h;
}

static void kvmclock_report(void)
{
	if (!have_kvmclock) {
		pr("ftg: kvmclock absent\n");
		return;
	}
	u64 t1 = kvmclock_ns();
	u64 s = rdtsc();
	while (rdtsc() - s < 10000000)	/* a few ms */
		cpu_relax();
	u64 t2 = kvmclock_ns();
	if (t2 > t1)
		pr("ftg: kvmclock ok delta_ns=%u\n", t2 - t1);
	else
		pr("ftg: kvmclock stuck\n");
}

static void read_line_echo(void)
{
	char line[256];
	unsigned n = 0;
	pr("ftg: ready for input\n");
	for (;;) {
		while (!(inb(COM1 + 5) & 1))
			cpu_relax();
		char c = (char)inb(COM1);
		if (c == '\r' || c == '\n')
			break;
		if (n + 1 < sizeof(line))
			line[n++] = c;
	}
	line[n] = 0;
	pr("ftg: echo %s\n", line);
}

static void __attribute__((noreturn)) do_action(const char *action, int quiet)
{
	if (!quiet)
		pr("ftg: action=%s\n", action);
	if (!memcmp(action, "poweroff", 9)) {
		acpi_poweroff();
		delay_us(100000);
		pr("ftg: poweroff failed\n");
		halt_forever();
	} else if (!memcmp(action, "acpi-reset", 11)) {
		acpi_reset();
		delay_us(100000);
		pr("ftg: acpi-reset failed\n");
		halt_forever();
	} else if (!memcmp(action, "i8042-reset", 12)) {
		outb(0x64, 0xfe);
		delay_us(100000);
		pr("ftg: i8042-reset failed\n");
		halt_forever();
	} else if (!memcmp(action, "triple-fault", 13)) {
		load_idt(0, 0);
		__asm__ volatile("xor %%ecx, %%ecx; div %%ecx" : : : "eax", "ecx", "edx");
		pr("ftg: triple-fault failed\n");
		halt_forever();
	} else if (!memcmp(action, "mmio-exec", 10)) {
		((void (*)(void))(uintptr_t)0xd0000000ull)();
		pr("ftg: mmio-exec failed\n");
		halt_forever();
	} else if (!memcmp(action, "halt", 5)) {
		halt_forever();
	} else if (!memcmp(action, "spin", 5)) {
		for (;;)
			__asm__ volatile("" ::: "memory");
	}
	pr("ftg: unknown action\n");
	halt_forever();
}

void ftg_main(int kind, u64 info);
void ftg_main(int kind, u64 info)
{
	static const char *const entry_names[] = { "bzimage", "bzimage", "pvh" };
	char action[32];

	entry_kind = kind;
	if (kind == FTG_ENTRY_PVH)
		read_pvh_start_info(info);
	else
		read_boot_params(info);

	serial_init();
	opt_word("action", action, sizeof(action), "poweroff");
	pr("ftg: hello entry=%s\n", entry_names[kind]);
	if (pvh_bad_magic)
		pr("ftg: pvh bad magic\n");

	idt_init();
	pic_mask();
	time_init();

	if (opt_is("quick", "1", 0)) {
		acpi_quiet = 1;
		acpi_scan();
		do_action(action, 1);
	}

	pr("ftg: cmdline=%s\n", cmdline);
	u64 ram = 0;
	for (unsigned i = 0; i < n_e820; i++) {
		pr("ftg: e820 start=0x%x size=0x%x type=%u\n", e820[i].addr, e820[i].size,
		   (u64)e820[i].type);
		if (e820[i].type == 1)
			ram += e820[i].size;
	}
	pr("ftg: ram_total_kib=%u\n", ram / 1024);

	if (have_initrd)
		pr("ftg: initrd addr=0x%x size=%u fnv1a64=0x%X\n", initrd_addr, initrd_size,
		   fnv1a64(initrd_addr, initrd_size));
	else
		pr("ftg: initrd none\n");

	acpi_scan();
	if (rsdp_addr)
		pr("ftg: acpi rsdp=0x%x madt_cpus=%u hw_reduced=%u\n", rsdp_addr, (u64)madt_cpus,
		   (u64)hw_reduced);
	else
		pr("ftg: acpi none\n");

	lapic_init();
	u32 bsp = cpuid_apic_id();
	pr("ftg: cpu apic_id=%u bsp\n", (u64)bsp);
	if (opt_is("smp", "1", 1)) {
		start_aps(bsp);
		u32 online = ap_online;
		for (u32 i = 0; i < FTG_MAX_APS; i++)
			if (ap_ids[i] & 0x80000000u)
				pr("ftg: cpu apic_id=%u online\n", (u64)(ap_ids[i] & 0x7fffffffu));
		pr("ftg: cpus online=%u\n", (u64)online + 1);
	} else {
		pr("ftg: cpus online=1 smp=off\n");
	}

	kvmclock_report();

	int ok;
	u32 ticks = timer_test(&ok);
	pr("ftg: timer irqs=%u %s\n", (u64)ticks, ok ? "ok" : "timeout");

	if (opt_is("echo", "1", 0))
		read_line_echo();
	int forever = opt_is("count", "forever", 0);
	u64 count = opt_num("count", 0);
	u64 count_ms = opt_num("count_ms", 0);
	for (u64 i = 1; forever || i <= count; i++) {
		if (i > 1 && count_ms)
			sleep_ms(count_ms, ok);
		if (ctrl_alt_del_typed()) {
			pr("ftg: shutdown request\n");
			do_action("poweroff", 1);
		}
		pr("ftg: count %u\n", i);
	}

	do_action(action, 0);
}
