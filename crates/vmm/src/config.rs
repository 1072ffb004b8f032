//! What the user asked for: `VmConfig`, from the command line or a config file, and its
//! validation. Every check here fails with a message that names the setting and what to do.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=1";
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Smallest guest accepted: room for the legacy area, boot structures and a small kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// The ACPI MADT numbers CPUs with 8-bit APIC IDs, and the I/O APIC takes one.
pub const MAX_VCPUS: u32 = 254;

/// A memory size. Parses `512`, `512M`, `512MiB`, `2G`, `2GiB`, `1048576K` (a bare number is
/// MiB, as in QEMU's `-m`); serialises as a string like `"512M"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize {
    pub bytes: u64,
}

impl MemorySize {
    pub const fn from_mib(mib: u64) -> Self {
        MemorySize { bytes: mib << 20 }
    }
    pub fn mib(&self) -> u64 {
        self.bytes >> 20
    }
}

impl Default for MemorySize {
    fn default() -> Self {
        MemorySize::from_mib(DEFAULT_MEMORY_MIB)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bytes.is_multiple_of(1 << 40) {
            write!(f, "{}T", self.bytes >> 40)
        } else if self.bytes.is_multiple_of(1 << 30) {
            write!(f, "{}G", self.bytes >> 30)
        } else if self.bytes.is_multiple_of(1 << 20) {
            write!(f, "{}M", self.bytes >> 20)
        } else {
            write!(f, "{}K", self.bytes >> 10)
        }
    }
}

impl FromStr for MemorySize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(digits_end);
        let bad = || format!("'{s}' is not a memory size; write e.g. 512M or 2G");
        let value: u64 = num.parse().map_err(|_| bad())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "m" | "mb" | "mib" => 20,
            "k" | "kb" | "kib" => 10,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(bad()),
        };
        let bytes = value
            .checked_mul(1u64 << shift)
            .ok_or_else(|| format!("memory size '{s}' is too large"))?;
        if !bytes.is_multiple_of(4096) {
            return Err(format!("memory size '{s}' is not a multiple of 4 KiB"));
        }
        Ok(MemorySize { bytes })
    }
}

impl Serialize for MemorySize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Mib(mib) => mib
                .checked_mul(1 << 20)
                .map(|bytes| MemorySize { bytes })
                .ok_or_else(|| serde::de::Error::custom("memory size is too large")),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What to do when the guest resets the machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnReboot {
    /// End `ferrovisor run` with the reboot exit code.
    #[default]
    Exit,
    /// Start the guest again from its kernel, as a PC would.
    Restart,
}

impl FromStr for OnReboot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exit" => Ok(OnReboot::Exit),
            "restart" => Ok(OnReboot::Restart),
            _ => Err(format!("'{s}' is not a reboot action; use exit or restart")),
        }
    }
}

/// Which vCPU back end runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// KVM where the host has hardware virtualization, the emulator otherwise.
    #[default]
    Auto,
    /// Hardware-assisted virtualization through /dev/kvm.
    Kvm,
    /// Ferrovisor's own x86-64 emulator.
    Emu,
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "kvm" => Ok(Backend::Kvm),
            "emu" => Ok(Backend::Emu),
            _ => Err(format!("'{s}' is not a back end; use kvm, emu or auto")),
        }
    }
}

/// A virtio-blk disk: a raw image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    /// The guest cannot write it; the image is opened read-only and shared-locked.
    #[serde(default)]
    pub read_only: bool,
    /// What the guest reads as the disk's serial (/dev/disk/by-id/virtio-SERIAL), at most
    /// 20 bytes; the image's file name by default.
    #[serde(default)]
    pub serial: Option<String>,
}

impl DiskConfig {
    /// The serial the guest reads: the one given, or the image's file name.
    pub fn effective_serial(&self) -> String {
        self.serial.clone().unwrap_or_else(|| {
            self.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
    }
}

/// A MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a MAC address; write e.g. 52:54:00:12:34:56");
        let mut m = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut m {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if m[0] & 1 != 0 {
            return Err(format!(
                "MAC address {s} is a multicast address; the first byte must be even"
            ));
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A virtio-net interface on a tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The tap's name; opened if it exists, created (for the life of the VM) if it does not and
    /// the VMM may.
    pub tap: String,
    /// The guest's MAC address; by default 52:54:00 and three bytes derived from the tap's
    /// name, so it is stable across runs and differs between taps.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    /// The MAC address the guest gets.
    pub fn mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| {
            let h = self.tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let b = h.to_le_bytes();
            MacAddr([0x52, 0x54, 0x00, b[0], b[1], b[2]])
        })
    }
}

impl FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut tap = None;
        let mut mac = None;
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("tap", v)) => tap = Some(v.to_string()),
                Some(("mac", v)) => mac = Some(v.parse()?),
                Some((k, _)) => {
                    return Err(format!(
                        "unknown network option '{k}' in '{s}'; use tap= and mac="
                    ))
                }
                None => return Err(format!("'{item}' in '{s}' is not key=value")),
            }
        }
        let tap = tap
            .filter(|t| !t.is_empty())
            .ok_or_else(|| format!("network '{s}' has no tap; write tap=NAME"))?;
        Ok(NetConfig { tap, mac })
    }
}

/// Most disks one VM takes: the PCI root bus has 31 slots for devices, and other devices
/// need some.
pub const MAX_DISKS: usize = 24;
/// Most network interfaces one VM takes.
pub const MAX_NETS: usize = 4;
/// Longest disk serial virtio-blk can report.
pub const MAX_DISK_SERIAL: usize = 20;

/// Parses a `true`/`false` style switch of a `key=value` list.
fn parse_switch(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("'{key}={v}': use {key}=on or {key}=off")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;

    /// `path=IMAGE[,ro=on|off][,serial=S]`, or just `IMAGE`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut disk = DiskConfig {
            path: PathBuf::new(),
            read_only: false,
            serial: None,
        };
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("path", v)) => disk.path = PathBuf::from(v),
                Some(("ro" | "readonly" | "read_only", v)) => {
                    disk.read_only = parse_switch("ro", v)?
                }
                Some(("serial", v)) => disk.serial = Some(v.to_string()),
                Some((k, _)) => {
                    return Err(format!(
                        "unknown disk option '{k}' in '{s}'; use path=, ro= and serial="
                    ))
                }
                None if disk.path.as_os_str().is_empty() && !item.is_empty() => {
                    disk.path = PathBuf::from(item)
                }
                None => return Err(format!("'{item}' in '{s}' is not key=value")),
            }
        }
        if disk.path.as_os_str().is_empty() {
            return Err(format!("disk '{s}' has no image; write path=IMAGE"));
        }
        Ok(disk)
    }
}

/// A virtio-vsock device whose host side is a unix socket (Firecracker's scheme): host programs
/// connect to `uds` and write `CONNECT <port>\n` to reach a guest port; guest connections to
/// host port P go to the socket `<uds>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (its vsock address): 3 to 4294967294.
    pub cid: u64,
    /// The unix socket the VMM listens on while the VM runs.
    pub uds: PathBuf,
}

/// Longest `uds` path: a socket address holds 107 bytes, and `_<port>` takes up to 11.
pub const MAX_VSOCK_PATH: usize = 96;

impl VsockConfig {
    /// Checks the CID and the socket path's length.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(3..=u64::from(u32::MAX) - 1).contains(&self.cid) {
            return Err(ConfigError::VsockCid(self.cid));
        }
        let len = self.uds.as_os_str().len();
        if len == 0 || len > MAX_VSOCK_PATH {
            return Err(ConfigError::VsockPathLength(len));
        }
        Ok(())
    }
}

impl FromStr for VsockConfig {
    type Err = String;

    /// `cid=N,uds=PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("cid", v)) => {
                    cid = Some(v.parse::<u64>().map_err(|_| {
                        format!("vsock cid '{v}' is not a number; write e.g. cid=3")
                    })?)
                }
                Some(("uds" | "path", v)) => uds = Some(PathBuf::from(v)),
                Some((k, _)) => {
                    return Err(format!(
                        "unknown vsock option '{k}' in '{s}'; use cid= and uds="
                    ))
                }
                None => return Err(format!("'{item}' in '{s}' is not key=value")),
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds }),
            _ => Err(format!(
                "vsock '{s}' needs both settings; write cid=N,uds=PATH"
            )),
        }
    }
}

/// A virtio-balloon device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The target at boot: how much memory the guest should give back.
    #[serde(default = "zero_size")]
    pub size: MemorySize,
    /// Offer DEFLATE_ON_OOM: the guest takes pages back from the balloon before it would
    /// kill a process for memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// A unix socket for changing the target while the guest runs (`set 512M`) and reading
    /// the guest's memory statistics (`stats`).
    #[serde(default)]
    pub control: Option<PathBuf>,
}

fn zero_size() -> MemorySize {
    MemorySize { bytes: 0 }
}

/// Longest balloon control socket path (a socket address holds 107 bytes).
pub const MAX_BALLOON_CONTROL_PATH: usize = 107;

impl BalloonConfig {
    /// Checks the target against guest memory and the socket path's length.
    pub fn validate(&self, memory: MemorySize) -> Result<(), ConfigError> {
        if self.size > memory {
            return Err(ConfigError::BalloonTooLarge {
                size: self.size,
                memory,
            });
        }
        if let Some(p) = &self.control {
            let len = p.as_os_str().len();
            if len == 0 || len > MAX_BALLOON_CONTROL_PATH {
                return Err(ConfigError::BalloonPathLength(len));
            }
        }
        Ok(())
    }
}

impl FromStr for BalloonConfig {
    type Err = String;

    /// `[size=SIZE][,deflate_on_oom=on][,control=PATH]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = BalloonConfig {
            size: zero_size(),
            ..BalloonConfig::default()
        };
        for item in s.split(',').filter(|i| !i.is_empty()) {
            match item.split_once('=') {
                Some(("size", v)) => b.size = v.parse()?,
                Some(("deflate_on_oom", v)) => b.deflate_on_oom = parse_switch("deflate_on_oom", v)?,
                Some(("control", v)) => b.control = Some(PathBuf::from(v)),
                Some((k, _)) => {
                    return Err(format!(
                        "unknown balloon option '{k}' in '{s}'; use size=, deflate_on_oom= and control="
                    ))
                }
                None => return Err(format!("'{item}' in '{s}' is not key=value")),
            }
        }
        Ok(b)
    }
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn default_cpus() -> u32 {
    1
}

/// One VM, as the user described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default)]
    pub memory: MemorySize,
    #[serde(default)]
    pub on_reboot: OnReboot,
    #[serde(default)]
    pub backend: Backend,
    /// Run on the emulator with guest time from the instruction count: the same guest with the
    /// same input gives the same output on every run.
    #[serde(default)]
    pub deterministic: bool,
    /// virtio-blk disks, /dev/vda first.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// virtio-net interfaces, eth0 first.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device (one per VM).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device (one per VM).
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
}

/// A setting the user got wrong. The message says which and what to do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {requested} exceeds the limit of {limit} vCPUs on this host")]
    TooManyCpus { requested: u32, limit: u32 },
    #[error("--memory {0} is too small; a guest needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall(MemorySize),
    #[error("--memory {requested} exceeds what this host can back ({limit_mib} MiB of RAM and swap); give the guest less memory")]
    MemoryTooLarge {
        requested: MemorySize,
        limit_mib: u64,
    },
    #[error("the kernel command line is {len} bytes; the limit is {max} bytes")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("--deterministic needs the emulator; use --backend emu (or auto)")]
    DeterministicNeedsEmu,
    #[error("disk image {0} is given twice; a VM opens each image once")]
    DuplicateDisk(PathBuf),
    #[error("disk serial '{0}' is longer than {MAX_DISK_SERIAL} bytes")]
    DiskSerialTooLong(String),
    #[error("too many disks ({0}); the PCI bus has room for at most {MAX_DISKS}")]
    TooManyDisks(usize),
    #[error("too many network interfaces ({0}); at most {MAX_NETS}")]
    TooManyNets(usize),
    #[error("tap '{0}' is given twice; give each interface its own tap")]
    DuplicateTap(String),
    #[error("MAC address {0} is given to two interfaces; give each its own")]
    DuplicateMac(MacAddr),
    #[error("vsock cid {0} is not a guest address; use a number from 3 to 4294967294")]
    VsockCid(u64),
    #[error("the vsock socket path is {0} bytes; it must be 1 to {MAX_VSOCK_PATH} bytes")]
    VsockPathLength(usize),
    #[error("--balloon size={size} exceeds --memory {memory}; the balloon can take at most all of guest memory")]
    BalloonTooLarge {
        size: MemorySize,
        memory: MemorySize,
    },
    #[error("the snapshot has {saved} {what}(s) but {given} were given to replace them; give exactly {saved} (devices keep their places)")]
    OverrideCount {
        what: &'static str,
        saved: usize,
        given: usize,
    },
    #[error("the balloon control socket path is {0} bytes; it must be 1 to {MAX_BALLOON_CONTROL_PATH} bytes")]
    BalloonPathLength(usize),
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            memory: MemorySize::default(),
            on_reboot: OnReboot::default(),
            backend: Backend::default(),
            deterministic: false,
            disks: Vec::new(),
            rng: false,
            nets: Vec::new(),
            vsock: None,
            balloon: None,
        }
    }

    /// Checks the settings that need no files or devices. `max_vcpus` is the back end's limit,
    /// `host_memory_bytes` what the host can back (RAM plus swap).
    pub fn validate(&self, max_vcpus: u32, host_memory_bytes: u64) -> Result<(), ConfigError> {
        if self.cpus == 0 {
            return Err(ConfigError::NoCpus);
        }
        let limit = max_vcpus.min(MAX_VCPUS);
        if self.cpus > limit {
            return Err(ConfigError::TooManyCpus {
                requested: self.cpus,
                limit,
            });
        }
        if self.memory.bytes < MemorySize::from_mib(MIN_MEMORY_MIB).bytes {
            return Err(ConfigError::MemoryTooSmall(self.memory));
        }
        if self.memory.bytes > host_memory_bytes {
            return Err(ConfigError::MemoryTooLarge {
                requested: self.memory,
                limit_mib: host_memory_bytes >> 20,
            });
        }
        if self.deterministic && self.backend == Backend::Kvm {
            return Err(ConfigError::DeterministicNeedsEmu);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        for (i, d) in self.disks.iter().enumerate() {
            if self.disks[..i].iter().any(|e| e.path == d.path) {
                return Err(ConfigError::DuplicateDisk(d.path.clone()));
            }
            if let Some(s) = d.serial.as_ref().filter(|s| s.len() > MAX_DISK_SERIAL) {
                return Err(ConfigError::DiskSerialTooLong(s.clone()));
            }
        }
        if self.nets.len() > MAX_NETS {
            return Err(ConfigError::TooManyNets(self.nets.len()));
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|e| e.tap == n.tap) {
                return Err(ConfigError::DuplicateTap(n.tap.clone()));
            }
            if self.nets[..i].iter().any(|e| e.mac() == n.mac()) {
                return Err(ConfigError::DuplicateMac(n.mac()));
            }
        }
        if let Some(v) = &self.vsock {
            v.validate()?;
        }
        if let Some(b) = &self.balloon {
            b.validate(self.memory)?;
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        let max = arch::layout::CMDLINE_MAX_SIZE - 1;
        if self.cmdline.len() > max {
            return Err(ConfigError::CmdlineTooLong {
                len: self.cmdline.len(),
                max,
            });
        }
        Ok(())
    }
}

/// RAM plus swap of the host, in bytes: the most guest memory that can ever be backed.
pub fn host_memory_bytes() -> u64 {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: sysinfo writes a `struct sysinfo` to the pointer, which is valid and sized for it.
    let ret = unsafe { libc::sysinfo(info.as_mut_ptr()) };
    if ret != 0 {
        return u64::MAX;
    }
    // SAFETY: sysinfo returned 0, so it filled the struct.
    let info = unsafe { info.assume_init() };
    let unit = u64::from(info.mem_unit.max(1));
    (info.totalram + info.totalswap).saturating_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: u64 = 16 << 30;

    #[test]
    fn memory_sizes_parse_with_units() {
        assert_eq!(
            "512".parse::<MemorySize>().unwrap(),
            MemorySize::from_mib(512)
        );
        assert_eq!(
            "512M".parse::<MemorySize>().unwrap(),
            MemorySize::from_mib(512)
        );
        assert_eq!(
            "3GiB".parse::<MemorySize>().unwrap(),
            MemorySize::from_mib(3072)
        );
        assert_eq!(
            "2g".parse::<MemorySize>().unwrap(),
            MemorySize::from_mib(2048)
        );
        assert_eq!(
            "131072K".parse::<MemorySize>().unwrap(),
            MemorySize::from_mib(128)
        );
    }

    #[test]
    fn bad_memory_sizes_are_refused() {
        for bad in ["", "M", "12X", "-1G", "1.5G", "99999999999999999999T", "1K"] {
            assert!(bad.parse::<MemorySize>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn memory_size_displays_in_the_largest_exact_unit() {
        assert_eq!(MemorySize::from_mib(2048).to_string(), "2G");
        assert_eq!(MemorySize::from_mib(100).to_string(), "100M");
    }

    #[test]
    fn config_file_accepts_numbers_and_strings_for_memory() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "memory": 512, "cpus": 2}"#).unwrap();
        assert_eq!(c.memory, MemorySize::from_mib(512));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "memory": "1G"}"#).unwrap();
        assert_eq!(c.memory, MemorySize::from_mib(1024));
    }

    #[test]
    fn config_file_rejects_unknown_settings() {
        let err = serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "cpu": 2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
    }

    #[test]
    fn validation_catches_each_bad_setting() {
        let ok = VmConfig::new("/k".into());
        assert_eq!(ok.validate(8, HOST), Ok(()));
        let with = |f: &dyn Fn(&mut VmConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate(8, HOST).unwrap_err()
        };
        assert_eq!(with(&|c| c.cpus = 0), ConfigError::NoCpus);
        assert_eq!(
            with(&|c| c.cpus = 9),
            ConfigError::TooManyCpus {
                requested: 9,
                limit: 8
            }
        );
        assert!(matches!(
            with(&|c| c.memory = MemorySize::from_mib(8)),
            ConfigError::MemoryTooSmall(_)
        ));
        assert!(matches!(
            with(&|c| c.memory = MemorySize::from_mib(32 << 10)),
            ConfigError::MemoryTooLarge { .. }
        ));
        assert!(matches!(
            with(&|c| c.cmdline = "x".repeat(4096)),
            ConfigError::CmdlineTooLong { .. }
        ));
        assert_eq!(
            with(&|c| c.cmdline = "a\0b".into()),
            ConfigError::CmdlineNul
        );
    }

    #[test]
    fn vsock_settings_parse_and_validate() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds.to_str()), (3, Some("/tmp/v.sock")));
        for bad in [
            "cid=3",
            "uds=/x",
            "cid=x,uds=/x",
            "cid=3,uds=/x,port=1",
            "3",
        ] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad} accepted");
        }
        let mut c = VmConfig::new("/k".into());
        for cid in [0, 2, u64::from(u32::MAX), 1 << 40] {
            c.vsock = Some(VsockConfig {
                cid,
                uds: "/tmp/v.sock".into(),
            });
            assert_eq!(c.validate(8, HOST), Err(ConfigError::VsockCid(cid)));
        }
        c.vsock = Some(VsockConfig {
            cid: 3,
            uds: "/".repeat(MAX_VSOCK_PATH + 1).into(),
        });
        assert_eq!(
            c.validate(8, HOST),
            Err(ConfigError::VsockPathLength(MAX_VSOCK_PATH + 1))
        );
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "vsock": {"cid": 7, "uds": "v.sock"}}"#)
                .unwrap();
        assert_eq!(c.vsock.map(|v| v.cid), Some(7));
    }

    #[test]
    fn balloon_settings_parse_and_validate() {
        let b: BalloonConfig = "size=512M,deflate_on_oom=on,control=/tmp/b.sock"
            .parse()
            .unwrap();
        assert_eq!(b.size, MemorySize::from_mib(512));
        assert!(b.deflate_on_oom);
        assert_eq!(
            b.control.as_deref(),
            Some(std::path::Path::new("/tmp/b.sock"))
        );
        let b: BalloonConfig = "control=/tmp/b.sock".parse().unwrap();
        assert_eq!((b.size.bytes, b.deflate_on_oom), (0, false));
        for bad in [
            "size=1K",
            "size=x",
            "deflate_on_oom=maybe",
            "bogus=1",
            "512M",
        ] {
            assert!(bad.parse::<BalloonConfig>().is_err(), "{bad} accepted");
        }
        let mut c = VmConfig::new("/k".into());
        c.balloon = Some("size=256M".parse().unwrap());
        assert_eq!(c.validate(8, HOST), Ok(()));
        c.balloon = Some("size=257M".parse().unwrap());
        assert!(matches!(
            c.validate(8, HOST),
            Err(ConfigError::BalloonTooLarge { .. })
        ));
        c.balloon = Some(BalloonConfig {
            control: Some("x".repeat(MAX_BALLOON_CONTROL_PATH + 1).into()),
            ..BalloonConfig::default()
        });
        assert_eq!(
            c.validate(8, HOST),
            Err(ConfigError::BalloonPathLength(MAX_BALLOON_CONTROL_PATH + 1))
        );
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "balloon": {"size": "128M"}}"#).unwrap();
        assert_eq!(c.balloon.map(|b| b.size), Some(MemorySize::from_mib(128)));
        let c: VmConfig = serde_json::from_str(r#"{"kernel": "/k", "balloon": {}}"#).unwrap();
        assert_eq!(c.balloon.map(|b| b.size.bytes), Some(0));
    }

    #[test]
    fn vcpu_limit_is_capped_by_the_platform() {
        let mut c = VmConfig::new("/k".into());
        c.cpus = 255;
        assert_eq!(
            c.validate(1024, HOST),
            Err(ConfigError::TooManyCpus {
                requested: 255,
                limit: 254
            })
        );
    }
}
