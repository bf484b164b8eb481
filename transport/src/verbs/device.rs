//! Device discovery: the devices libibverbs lists, their ports and set GIDs, or why there are none.

use std::ffi::CStr;
use std::fmt;
use std::os::raw::c_int;
use std::ptr::NonNull;

use rdma_sys as sys;

use super::NoRdma;

/// What [`probe`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// At least one device has an ACTIVE port (devices without one are listed too).
    Available(Vec<Device>),
    /// No usable RDMA here, and why.
    Unavailable(NoRdma),
}

/// One RDMA device and its ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub firmware: String,
    pub ports: Vec<Port>,
    /// Set when the device is listed but could not be opened or queried.
    pub error: Option<String>,
}

impl Device {
    /// The first ACTIVE port.
    pub fn active_port(&self) -> Option<&Port> {
        self.ports.iter().find(|p| p.state == PortState::Active)
    }
}

/// One port of a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port number, from 1.
    pub number: u8,
    pub state: PortState,
    /// Active path MTU in bytes.
    pub active_mtu: u32,
    pub max_mtu: u32,
    /// "InfiniBand", "Ethernet" (RoCE) or "unspecified".
    pub link_layer: &'static str,
    pub lid: u16,
    /// Entries of the GID table that are set (non-zero), with their index.
    pub gids: Vec<(u32, Gid)>,
    /// Size of the GID table.
    pub gid_table_len: u32,
}

impl Port {
    /// Index of the first IPv4-mapped GID (`::ffff:a.b.c.d`), the one RoCE v2 peers on IPv4
    /// (and soft-RoCE on loopback) address each other by.
    pub fn ipv4_mapped_gid(&self) -> Option<u32> {
        self.gids
            .iter()
            .find(|(_, gid)| gid.is_ipv4_mapped())
            .map(|(index, _)| *index)
    }
}

/// Port states, as `ibv_port_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Nop,
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Unknown(u32),
}

impl PortState {
    fn from_raw(raw: u32) -> Self {
        use sys::ibv_port_state::*;
        match raw {
            IBV_PORT_NOP => PortState::Nop,
            IBV_PORT_DOWN => PortState::Down,
            IBV_PORT_INIT => PortState::Init,
            IBV_PORT_ARMED => PortState::Armed,
            IBV_PORT_ACTIVE => PortState::Active,
            IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Unknown(other),
        }
    }
}

impl fmt::Display for PortState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortState::Nop => f.write_str("NOP"),
            PortState::Down => f.write_str("DOWN"),
            PortState::Init => f.write_str("INIT"),
            PortState::Armed => f.write_str("ARMED"),
            PortState::Active => f.write_str("ACTIVE"),
            PortState::ActiveDefer => f.write_str("ACTIVE_DEFER"),
            PortState::Unknown(raw) => write!(f, "unknown ({raw})"),
        }
    }
}

/// A 128-bit GID, in network byte order as the hardware holds it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    pub fn is_ipv4_mapped(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10..12] == [0xff, 0xff]
    }
}

impl fmt::Display for Gid {
    /// The form `ibv_devinfo -v` and sysfs use: eight groups of four hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, pair) in self.0.chunks(2).enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{:02x}{:02x}", pair[0], pair[1])?;
        }
        Ok(())
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `ibv_mtu` to bytes (256 << (mtu - 1)); 0 for values outside the enumeration.
pub(super) fn mtu_bytes(raw: u32) -> u32 {
    if (1..=5).contains(&raw) {
        256 << (raw - 1)
    } else {
        0
    }
}

fn link_layer_name(raw: u8) -> &'static str {
    // verbs.h's anonymous enum: IBV_LINK_LAYER_UNSPECIFIED, _INFINIBAND, _ETHERNET.
    match raw {
        1 => "InfiniBand",
        2 => "Ethernet",
        _ => "unspecified",
    }
}

/// The device list of libibverbs; freed on drop.
pub(super) struct DeviceList {
    list: NonNull<*mut sys::ibv_device>,
    len: usize,
}

impl DeviceList {
    pub(super) fn get() -> Result<DeviceList, NoRdma> {
        let mut count: c_int = 0;
        // SAFETY: ibv_get_device_list writes the count through the pointer we pass (a live
        // local) and returns either NULL with errno set or an array of `count` device pointers
        // that stays valid until ibv_free_device_list.
        let raw = unsafe { sys::ibv_get_device_list(&mut count) };
        let Some(list) = NonNull::new(raw) else {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOSYS) => NoRdma::KernelWithoutRdma,
                Some(libc::ENODEV) | Some(libc::ENOENT) => NoRdma::NoDeviceNode,
                _ => NoRdma::ListFailed(err.to_string()),
            });
        };
        Ok(DeviceList {
            list,
            len: usize::try_from(count).unwrap_or(0),
        })
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The device pointer at `index` (< len) and its name.
    pub(super) fn device(&self, index: usize) -> (*mut sys::ibv_device, String) {
        assert!(index < self.len);
        // SAFETY: `index < len`, and the array holds `len` valid device pointers while the list
        // is alive (libibverbs contract of ibv_get_device_list).
        let dev = unsafe { *self.list.as_ptr().add(index) };
        // SAFETY: a listed device has a NUL-terminated name owned by the library, valid while
        // the list is; we copy it out at once.
        let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        (dev, name)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once, here. Contexts
        // opened from its devices stay valid after the list is freed (libibverbs contract).
        unsafe { sys::ibv_free_device_list(self.list.as_ptr()) };
    }
}

/// An opened device context; closed on drop (after everything created from it, which holds an
/// `Arc` of it).
pub(super) struct RawContext {
    pub(super) ctx: NonNull<sys::ibv_context>,
    pub(super) name: String,
}

// SAFETY: libibverbs contexts are thread-safe (the library serialises its own state); DVM never
// hands out a reference that outlives the context.
unsafe impl Send for RawContext {}
// SAFETY: as above: every verbs call on a context may be made from several threads at once.
unsafe impl Sync for RawContext {}

impl RawContext {
    pub(super) fn open(dev: *mut sys::ibv_device, name: String) -> Result<RawContext, String> {
        // SAFETY: `dev` is a live entry of a device list that the caller keeps alive for this
        // call; ibv_open_device returns NULL with errno set on failure.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        match NonNull::new(ctx) {
            Some(ctx) => Ok(RawContext { ctx, name }),
            None => Err(format!(
                "ibv_open_device: {}",
                std::io::Error::last_os_error()
            )),
        }
    }

    pub(super) fn query_device(&self) -> Result<sys::ibv_device_attr, i32> {
        // SAFETY: ibv_device_attr is a plain C struct of integers and arrays; all zeros is valid.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open, and `attr` is a live, writable struct of the type the
        // call fills.
        let rc = unsafe { sys::ibv_query_device(self.ctx.as_ptr(), &mut attr) };
        if rc == 0 {
            Ok(attr)
        } else {
            Err(errno_of(rc))
        }
    }

    pub(super) fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr, i32> {
        // SAFETY: ibv_port_attr is a plain C struct of integers; all zeros is valid.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; `attr` is live and writable, and the rdma-sys wrapper
        // passes its size so the provider fills at most that much.
        let rc = unsafe { sys::___ibv_query_port(self.ctx.as_ptr(), port, &mut attr) };
        if rc == 0 {
            Ok(attr)
        } else {
            Err(errno_of(rc))
        }
    }

    pub(super) fn query_gid(&self, port: u8, index: u32) -> Result<Gid, i32> {
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        let index = c_int::try_from(index).map_err(|_| libc::EINVAL)?;
        // SAFETY: the context is open and `gid` is a live 16-byte union the call writes.
        let rc = unsafe { sys::ibv_query_gid(self.ctx.as_ptr(), port, index, &mut gid) };
        if rc != 0 {
            return Err(errno_of(rc));
        }
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        Ok(Gid(unsafe { gid.raw }))
    }

    /// The port's attributes and its set GIDs.
    pub(super) fn port(&self, number: u8) -> Result<Port, i32> {
        let attr = self.query_port(number)?;
        let gid_table_len = u32::try_from(attr.gid_tbl_len).unwrap_or(0);
        let mut gids = Vec::new();
        for index in 0..gid_table_len {
            // Unset entries fail on some providers and read as zeros on others: both mean unset.
            if let Ok(gid) = self.query_gid(number, index) {
                if !gid.is_zero() {
                    gids.push((index, gid));
                }
            }
        }
        Ok(Port {
            number,
            state: PortState::from_raw(attr.state),
            active_mtu: mtu_bytes(attr.active_mtu),
            max_mtu: mtu_bytes(attr.max_mtu),
            link_layer: link_layer_name(attr.link_layer),
            lid: attr.lid,
            gids,
            gid_table_len,
        })
    }
}

impl Drop for RawContext {
    fn drop(&mut self) {
        // SAFETY: the context was opened by ibv_open_device and is closed once; every object
        // created from it holds an Arc of it, so none is alive any more.
        let rc = unsafe { sys::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::warn!(device = %self.name, "ibv_close_device failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Verbs calls return either -1 with errno set or the error number itself (ibv_modify_qp,
/// ibv_post_send): both become an errno.
pub(super) fn errno_of(rc: c_int) -> i32 {
    if rc == -1 {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        rc.abs()
    }
}

/// Lists the RDMA devices with their ports, or says why this host has no usable RDMA.
pub fn probe() -> Probe {
    let list = match DeviceList::get() {
        Ok(list) => list,
        Err(why) => return Probe::Unavailable(why),
    };
    if list.len() == 0 {
        return Probe::Unavailable(NoRdma::NoDevices);
    }
    let mut devices = Vec::new();
    for index in 0..list.len() {
        let (dev, name) = list.device(index);
        devices.push(describe(dev, name));
    }
    if devices.iter().any(|d| d.active_port().is_some()) {
        Probe::Available(devices)
    } else {
        let summary = devices
            .iter()
            .map(|d| match (&d.error, d.ports.is_empty()) {
                (Some(err), _) => format!("{}: {err}", d.name),
                (None, true) => format!("{}: no ports", d.name),
                (None, false) => format!(
                    "{}: {}",
                    d.name,
                    d.ports
                        .iter()
                        .map(|p| format!("port {} {}", p.number, p.state))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Probe::Unavailable(NoRdma::NoActivePort(summary))
    }
}

fn describe(dev: *mut sys::ibv_device, name: String) -> Device {
    let mut device = Device {
        name: name.clone(),
        firmware: String::new(),
        ports: Vec::new(),
        error: None,
    };
    let ctx = match RawContext::open(dev, name) {
        Ok(ctx) => ctx,
        Err(err) => {
            device.error = Some(err);
            return device;
        }
    };
    let attr = match ctx.query_device() {
        Ok(attr) => attr,
        Err(errno) => {
            device.error = Some(format!(
                "ibv_query_device: {}",
                std::io::Error::from_raw_os_error(errno)
            ));
            return device;
        }
    };
    let fw: Vec<u8> = attr.fw_ver.iter().map(|&c| c as u8).collect();
    device.firmware = CStr::from_bytes_until_nul(&fw)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for number in 1..=attr.phys_port_cnt {
        match ctx.port(number) {
            Ok(port) => device.ports.push(port),
            Err(errno) => {
                device.error = Some(format!(
                    "ibv_query_port {number}: {}",
                    std::io::Error::from_raw_os_error(errno)
                ))
            }
        }
    }
    device
}
