//! One client: a program that forwarded its userfaultfd. Owns its shared window, its page
//! state, its store, and two threads:
//!
//! - the **control thread** (the connection's thread): reads the client's socket (region
//!   snapshots, fork requests), runs the policy every tick (posting eviction batches to the
//!   agent), compresses cooled pages from the window into the store and, with a disk tier,
//!   moves the coldest stored pages to disk ([`super::disktier`]);
//! - the **fault thread** ([`super::fault`]): reads the uffd, applies REMOVE/UNMAP/REMAP
//!   events, processes the agent's batch completions, and serves every fault. It never waits
//!   for the agent: a fault on a page the agent is still moving is parked until its batch
//!   completes.
//!
//! Both take the client's [`State`] lock only for short state transitions (and the fault thread
//! across the COPY/ZEROPAGE ioctl that makes a transition real, so no other transition can
//! slip between a decision and the kernel acting on it).
//!
//! Must not: touch the program other than through its forwarded descriptor and the window.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use super::compress::{Compressed, Pool};
use super::forks::{ForkSnapshot, Forks};
use super::pages::{PageState, Pages};
use super::regions::Regions;
use super::stats::{ClientReport, Counters, Latency, Percentiles, PolicyReport};
use crate::config::{Backend, ProgramConfig};
use crate::policy::controller::{ControllerParams, PressureController, Sample};
use crate::policy::regions::RegionStats;
use crate::policy::{ClockPolicy, PageClass, PageView, PolicyParams, SweepLimits};
use crate::protocol::io::{recv_packet, send_packet};
use crate::protocol::shm::{self, Window};
use crate::protocol::wire::{Msg, FORK_FAILED, NO_MEMBER, REGIONS_FIRST, REGIONS_LAST};
use crate::store::{DiskConfig, SharedStore, Store, StoreConfig, StoreError};
use crate::uffd::{Uffd, UffdError};
use crate::PAGE_SIZE;

const PAGE_BYTES: u64 = PAGE_SIZE as u64;

/// Window trim: free slots kept holding memory for reuse (4 MiB; the lowest, which are taken
/// first), the fewest worth a trim, and the most given back per tick.
const WINDOW_TRIM_RESERVE_SLOTS: u32 = 1024;
const WINDOW_TRIM_MIN_SLOTS: u32 = 256;
const WINDOW_TRIM_MAX_SLOTS: u32 = 4096;
/// Resident memory over the budget by more than an eighth of it, and at least this much, holds
/// prefetch back (see `Client::over_budget`): a small program's own unmanaged memory does not.
const OVER_BUDGET_MIN_BYTES: u64 = 32 << 20;
/// Longest wait for the agent's batches before a fork (the program is blocked in `fork` and a
/// busy agent may be slow).
const FORK_WAIT: Duration = Duration::from_secs(30);

/// `Regions` packets one client may send in one second. The shim sends at most 100 snapshots
/// a second, of one packet per 1024 regions; more is a flood, and a protocol error.
pub const MAX_REGIONS_PACKETS_PER_SEC: u32 = 10_000;

/// Store bytes held by all clients of one uid, against the daemon's `max_store_per_uid`.
#[derive(Debug)]
pub struct UidStore {
    /// Sum of the clients' `slab_bytes_mapped`; each client adds and removes its own share.
    pub bytes: AtomicU64,
    pub limit_bytes: u64,
}

/// What the daemon imposes on a client beyond its program config.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// A batch unanswered this long makes the monitor stop evicting from the client.
    pub agent_timeout: Duration,
    /// The uid's shared store usage, when a per-uid quota is configured.
    pub uid_store: Option<Arc<UidStore>>,
    /// The monitor's unclaimed fork snapshots.
    pub forks: Arc<Forks>,
    /// The monitor's compression workers (`None`: the control thread compresses alone).
    pub compress: Option<Arc<Pool>>,
    /// The monitor's idle-time recompression threads (`None`: no recompression).
    pub recompress: Option<Arc<super::recompress::Recompressor>>,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            agent_timeout: Duration::from_secs(5),
            uid_store: None,
            forks: Arc::default(),
            compress: None,
            recompress: None,
        }
    }
}

/// Who a client is: the monitor's id for it and the peer's credentials (SO_PEERCRED).
#[derive(Debug, Clone)]
pub struct ClientId {
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub name: String,
}

/// The control thread's watch on the agent: the oldest batch in flight and since when.
#[derive(Debug, Default)]
struct AgentWatch {
    oldest: Option<(u64, Instant)>,
}

/// Everything mutable about a client, behind one lock.
pub struct State {
    pub pages: Pages,
    /// This client's handle on its fork family's store (its own store unless it was forked
    /// from a managed program).
    pub store: SharedStore,
    pub regions: Regions,
    pub policy: ClockPolicy,
    /// Proactive reclaim and cold age, from the measured stall and promotion rate.
    pub controller: PressureController,
    /// Evictions and refaults per managed region.
    pub region_stats: RegionStats,
    /// Batches posted and not yet completed: (seq, slot per page in order).
    pub inflight: std::collections::VecDeque<(u64, Vec<u32>)>,
    /// For the last completed batches: (seq + 1, pages moved out over the client's life once
    /// that batch was counted). An RSS sample the agent read with `done_seq` = D is exact
    /// against the mark for D (`RssGauge::on_sample_at`).
    pub out_marks: std::collections::VecDeque<(u64, u64)>,
    pub next_seq: u64,
    /// Eviction paused (fork in progress, or detaching).
    pub paused: bool,
}

/// A mapped shared window; unmapped on drop.
pub struct Mapping {
    pub win: Window,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the window was mapped by `Client::new` with this base and length and no
        // `Window` copy outlives the client (threads are joined first).
        unsafe { libc::munmap(self.win.base().cast(), self.win.len_bytes()) };
    }
}

pub struct Client {
    pub id: u64,
    pub pid: i32,
    pub uid: u32,
    pub name: String,
    /// The parent's pid when this program was forked from a managed program, else 0.
    pub forked_from: u32,
    /// Adopted from a monitor that died (its pages came with its store file).
    pub adopted: bool,
    pub cfg: ProgramConfig,
    pub uffd: Uffd,
    /// Cross-mm: this client's entry in the arena keeper's table (dropped before the window
    /// and the arena are unmapped: fields drop in order).
    keeper: Option<super::keeper::Registration>,
    pub mapping: Mapping,
    pub req_efd: OwnedFd,
    pub done_efd: OwnedFd,
    /// Wakes the fault thread (shutdown, or a batch was posted).
    pub cmd_efd: OwnedFd,
    pub state: Mutex<State>,
    pub counters: Counters,
    pub latency: Latency,
    pub closing: AtomicBool,
    pub started: Instant,
    pub last_rss_seq: AtomicU64,
    /// The agent was asked to register regions (it keeps doing so at every scan).
    pub register_requested: AtomicBool,
    /// The cross-mm backend is active: the monitor moves pages between the program and
    /// `arena` itself (no agent batches). Chosen once, when the client attaches.
    pub cross_mm: AtomicBool,
    /// The monitor's own private pages, one per window slot (cross-mm backend only).
    arena: Option<memmap2::MmapMut>,
    /// The kernel refused to move a page the monitor allocated into the program (EXDEV: the
    /// two are in different memory cgroups); decompressed pages are copied in instead.
    pub move_in_refused: AtomicBool,
    pub limits: ClientLimits,
    /// The agent left a batch unanswered for `limits.agent_timeout`: no new batches are
    /// posted until every batch in flight is answered.
    pub agent_stalled: AtomicBool,
    /// Resident memory is well over the budget (more than an eighth and 32 MiB; cleared below
    /// a sixteenth and 16 MiB): faults bring back only the faulting page, so refaults do not outrun
    /// eviction (the kernel throttles a cgroup over its limit with direct reclaim instead).
    pub over_budget: AtomicBool,
    /// Resident memory between samples, and whether eviction is under way: the fault thread
    /// holds faults back over [`Client::throttle_line_bytes`] (`monitor/rss.rs`).
    pub rss: super::rss::RssGauge,
    /// Config `throttle` on and a budget: the line above which faults are held back.
    pub throttle_line_bytes: Option<u64>,
    /// Faults served as of the last compaction tick (compaction: a client that served none
    /// since is at rest, and its store is compacted down to the last chunk).
    pub compact_faults_mark: AtomicU64,
    /// Idle-time recompression jobs queued (control thread only).
    pub recompress_jobs: Mutex<super::recompress::Jobs>,
    /// Faults served as of the last recompression tick (a busy program gets less of it).
    pub recompress_faults_mark: AtomicU64,
    watch: Mutex<AgentWatch>,
    /// This client's share of `limits.uid_store`, in bytes.
    uid_store_share: AtomicU64,
    /// Disk tier: the family store's disk file (`None`: no disk tier).
    pub disk: Option<super::disktier::ClientDisk>,
    /// Disk tier: the control thread's ring for demotion writes (made at the first batch).
    pub(super) disk_writer: Mutex<Option<super::diskio::DiskIo>>,
    /// Disk tier: demoting until the store is under its low-water mark.
    pub(super) disk_draining: AtomicBool,
    /// Disk tier: the store's refused inserts at the last look.
    pub(super) disk_last_refused: AtomicU64,
    /// Disk tier: no demotion before this (monitor clock, ms), after a failed write.
    pub(super) disk_pause_until_ms: AtomicU64,
    /// The program's forked children that may still share its pages copy-on-write (see
    /// [`ForkedChildren`]).
    pub(super) children: Mutex<ForkedChildren>,
}

/// Whether the program may still share pages copy-on-write with a forked child: then a page
/// that refuses to move (EBUSY) is left as it is; with none alive, the agent makes such pages
/// the program's own again after the batch ([`shm::DESC_UNSHARE`]), so the memory a short-lived
/// child left marked shared can be evicted. Without it, those pages stayed resident until the
/// program wrote them, and the program's budget went to them (e2e
/// `pages_shared_with_an_exited_child_are_evicted_again`).
#[derive(Default)]
pub(super) struct ForkedChildren {
    /// Exit watches (pidfds) of children whose pid the program's `ForkDone` named.
    pidfds: Vec<OwnedFd>,
    /// A fork whose child is unknown (prepared, its pid not reported: a fork outside the
    /// shim's `fork` wrapper, or a family that was full) counts as a live child until then.
    unknown_until: Option<Instant>,
}

/// How long a forked child whose pid the monitor never learns counts as alive.
const UNKNOWN_CHILD_TTL: Duration = Duration::from_secs(30);

impl ForkedChildren {
    /// A fork is being prepared: its child is unknown until `ForkDone` names it.
    fn on_prepare(&mut self) {
        self.unknown_until = Some(Instant::now() + UNKNOWN_CHILD_TTL);
    }

    /// The program's `ForkDone`: `child_pid` 0 says nothing (the fork handler's resume);
    /// [`FORK_FAILED`] says no child was made.
    fn on_done(&mut self, child_pid: u32) {
        if child_pid == 0 {
            return;
        }
        if child_pid == FORK_FAILED || child_pid > i32::MAX as u32 {
            self.unknown_until = None;
            return;
        }
        match super::forks::pidfd_open(child_pid) {
            Ok(fd) => {
                self.pidfds.push(fd);
                self.unknown_until = None;
            }
            // Gone already: a short-lived child the program reaped before its `ForkDone` was
            // read (a busy machine). Waiting out the unknown child's time instead kept its
            // pages unevictable for 30 s (e2e `pages_shared_with_an_exited_child_are_evicted_
            // again`, seen failing that way in CI while the machine was loaded).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => self.unknown_until = None,
            // Otherwise the unknown child's time runs out on its own.
            Err(_) => {}
        }
    }

    /// Whether no forked child can share the program's pages any more (exited children are
    /// forgotten here).
    fn none_alive(&mut self) -> bool {
        self.pidfds.retain(|fd| {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack without waiting; a pidfd is readable
            // once its process has exited.
            let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
            rc == 0
        });
        self.pidfds.is_empty() && self.unknown_until.is_none_or(|t| Instant::now() >= t)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // A member of a fork family gives its pages up; the others keep theirs. (Alone, the
        // whole store goes with it.)
        let st = self.state.get_mut();
        if st.store.member_count() > 1 {
            let handles = st.pages.store_handles();
            st.store.release_all(handles);
        }
        if let Some(u) = &self.limits.uid_store {
            u.bytes.fetch_sub(
                self.uid_store_share.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
    }
}

/// A new durable store for a program with config `cfg`, with its disk tier if `disk_dir` is
/// set (and `max_store`, without which it would never be used). A disk file that cannot be
/// made leaves the program without a disk tier (`max_store` is a hard quota then), with a
/// warning.
fn new_store(client: u64, cfg: &ProgramConfig) -> anyhow::Result<Store> {
    let plain = || {
        Store::try_new(StoreConfig {
            durable: true,
            max_bytes: cfg.max_store_bytes,
            disk: None,
        })
        .context("creating the client's store file")
    };
    let Some(dir) = &cfg.disk_dir else {
        return plain();
    };
    if cfg.max_store_bytes.is_none() {
        warn!(
            client,
            dir = %dir.display(),
            "disk_dir is set but max_store is \"none\": the store never fills, so the disk tier is off"
        );
        return plain();
    }
    match Store::try_new(StoreConfig {
        durable: true,
        max_bytes: cfg.max_store_bytes,
        disk: Some(DiskConfig {
            dir: dir.clone(),
            max_bytes: cfg.max_disk_bytes,
        }),
    }) {
        Ok(s) => Ok(s),
        Err(StoreError::Disk(e)) => {
            warn!(
                client,
                dir = %dir.display(),
                error = %e,
                "disk tier off: cannot create its file in disk_dir; max_store is a hard quota"
            );
            plain()
        }
        Err(e) => Err(e).context("creating the client's store file"),
    }
}

fn eventfd() -> anyhow::Result<OwnedFd> {
    // SAFETY: eventfd(2) with constant flags returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd");
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Counts one page's batch result.
pub(super) fn count_result(c: &Counters, r: u8) {
    match r {
        shm::RESULT_MOVED => Counters::add(&c.pages_moved, 1),
        shm::RESULT_HOLE => Counters::add(&c.pages_holes, 1),
        shm::RESULT_BUSY => Counters::add(&c.pages_busy, 1),
        shm::RESULT_CANCELLED => Counters::add(&c.pages_cancelled, 1),
        shm::RESULT_DISCARDED => Counters::add(&c.pages_discarded, 1),
        _ => Counters::add(&c.pages_failed, 1),
    }
}

pub fn signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

pub fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: an 8-byte read from a non-blocking eventfd into a local.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Pages per eviction batch: the config's, within what one batch descriptor holds.
fn batch_pages(cfg: &ProgramConfig) -> u32 {
    cfg.batch_pages.min(shm::MAX_BATCH_PAGES as u32)
}

fn policy_params(cfg: &ProgramConfig) -> PolicyParams {
    PolicyParams {
        budget_bytes: cfg.budget_bytes,
        cooling: cfg.cooling,
        tick: cfg.tick,
        max_evict_bytes_per_sec: cfg.max_evict_bytes_per_sec,
        batch_pages: batch_pages(cfg),
        run_pages: cfg.run_pages,
        hot_ttl: cfg.hot_ttl,
    }
}

fn controller_params(cfg: &ProgramConfig) -> ControllerParams {
    ControllerParams {
        stall_target_ns_per_s: u64::try_from(cfg.stall_target_per_sec.as_nanos())
            .unwrap_or(u64::MAX),
        proactive_bytes_per_sec: cfg.proactive_bytes_per_sec,
        promotion_slo_per_min: cfg.promotion_slo_per_min,
        cooling: cfg.cooling,
        max_cold_age: cfg.max_cold_age,
    }
}

impl Client {
    /// Sets up the window and the durable store for a client whose `Hello` was accepted.
    /// Returns the client and the window memfd, store file and disk file (if the store has a
    /// disk tier) to send in the acknowledgement.
    pub fn new(
        who: ClientId,
        cfg: ProgramConfig,
        uffd: Uffd,
        limits: ClientLimits,
        inherit: Option<ForkSnapshot>,
    ) -> anyhow::Result<(Client, OwnedFd, OwnedFd, Option<OwnedFd>)> {
        let ClientId { id, pid, uid, name } = who;
        // Taken first: past this point a failure drops the member handle and the page list
        // without releasing any page (an adopted program's guardian then brings them home).
        let forked_from = inherit.as_ref().map_or(0, |s| s.parent_pid as u32);
        let adopted = inherit.as_ref().is_some_and(|s| s.adopted);
        let mut inherit = inherit;
        let (store, inherited_pages, registered) = match inherit.as_mut() {
            Some(snap) if snap.store.is_some() => (
                snap.store.take().expect("checked"),
                std::mem::take(&mut snap.pages),
                snap.registered,
            ),
            other => (
                SharedStore::new(new_store(id, &cfg)?),
                Vec::new(),
                other.is_some_and(|s| s.registered),
            ),
        };
        drop(inherit);
        let slots = ((cfg.window_bytes as usize) / PAGE_SIZE)
            .clamp(shm::MAX_BATCH_PAGES, super::pages::MAX_SLOTS);
        let len = shm::window_len_bytes(slots);
        // SAFETY: memfd_create with a static name and flags.
        let memfd = unsafe { libc::memfd_create(c"uswap-window".as_ptr(), libc::MFD_CLOEXEC) };
        if memfd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create for the window");
        }
        // SAFETY: a fresh descriptor we own.
        let memfd = unsafe { OwnedFd::from_raw_fd(memfd) };
        // SAFETY: sizing our own memfd.
        if unsafe { libc::ftruncate(memfd.as_raw_fd(), len as i64) } < 0 {
            return Err(std::io::Error::last_os_error()).context("sizing the window");
        }
        // SAFETY: a new shared mapping of our memfd at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the window");
        }
        // SAFETY: `base` is a fresh page-aligned mapping of `len` bytes that `Mapping` unmaps
        // only when the client is dropped.
        let win = unsafe { Window::new(base.cast(), len) };
        win.init();
        win.rescue_after_ms()
            .store(cfg.rescue_after.as_millis() as u64, Ordering::Relaxed);
        // A forked child joins its parent's store (its inherited pages are there); any other
        // client gets a store of its own.
        let store_fd = OwnedFd::from(
            store
                .file_clone()
                .context("duplicating the store file")?
                .expect("a durable store has a file"),
        );
        let has_cross_mm = uffd.has(crate::uffd::sys::UFFD_FEATURE_MOVE_CROSS_MM);
        let cross_mm = match cfg.backend {
            Backend::Auto => has_cross_mm,
            Backend::Stock => false,
            Backend::CrossMm => {
                if !has_cross_mm {
                    warn!(
                        client = id,
                        "backend = \"cross-mm\" but the program's descriptor lacks \
                         UFFD_FEATURE_MOVE_CROSS_MM (kernel without the patch): using stock"
                    );
                }
                has_cross_mm
            }
        };
        let arena = if cross_mm {
            let a = memmap2::MmapMut::map_anon(slots * PAGE_SIZE).context("mapping the arena")?;
            // SAFETY: advising our own fresh mapping; pages are moved in and out one by one.
            unsafe { libc::madvise(a.as_ptr() as *mut _, a.len(), libc::MADV_NOHUGEPAGE) };
            Some(a)
        } else {
            None
        };
        let mut pages = Pages::new(slots);
        let mut keeper = None;
        if let Some(a) = &arena {
            // The arena keeper saves the arena's pages into the window if the monitor dies.
            let records: Arc<[AtomicU64]> = (0..slots).map(|_| AtomicU64::new(0)).collect();
            pages.set_private_slot_records(records.clone());
            keeper = super::keeper::register(&win, a.as_ptr() as usize, records);
        } else {
            pages.set_slot_records(win);
        }
        // The disk tier (the family's: a forked child shares its parent's).
        let disk_file = store
            .lock()
            .disk_file()
            .map(std::fs::File::try_clone)
            .transpose()
            .context("duplicating the disk file")?;
        let disk_fd = disk_file
            .as_ref()
            .map(|f| f.try_clone().map(OwnedFd::from))
            .transpose()
            .context("duplicating the disk file")?;
        if disk_file.is_some() {
            pages.track_stored_order();
        }
        let mut store = store;
        for (addr, h) in inherited_pages {
            if !pages.adopt_stored(addr, h) {
                store.remove(h);
            }
        }
        let state = State {
            pages,
            store,
            regions: Regions::default(),
            policy: ClockPolicy::new(policy_params(&cfg)),
            controller: PressureController::new(controller_params(&cfg)),
            region_stats: RegionStats::default(),
            inflight: Default::default(),
            out_marks: Default::default(),
            next_seq: 0,
            paused: false,
        };
        let throttle_line_bytes = cfg
            .budget_bytes
            .filter(|_| !cfg.throttle.is_zero())
            .map(super::rss::throttle_line_bytes);
        let client = Client {
            id,
            pid,
            uid,
            name,
            forked_from,
            adopted,
            cfg,
            uffd,
            keeper,
            mapping: Mapping { win },
            req_efd: eventfd()?,
            done_efd: eventfd()?,
            cmd_efd: eventfd()?,
            state: Mutex::new(state),
            counters: Counters::default(),
            latency: Latency::default(),
            closing: AtomicBool::new(false),
            started: Instant::now(),
            last_rss_seq: AtomicU64::new(0),
            register_requested: AtomicBool::new(registered),
            cross_mm: AtomicBool::new(cross_mm),
            arena,
            move_in_refused: AtomicBool::new(false),
            limits,
            agent_stalled: AtomicBool::new(false),
            over_budget: AtomicBool::new(false),
            rss: super::rss::RssGauge::default(),
            throttle_line_bytes,
            compact_faults_mark: AtomicU64::new(0),
            recompress_jobs: Mutex::new(Default::default()),
            recompress_faults_mark: AtomicU64::new(0),
            watch: Mutex::new(AgentWatch::default()),
            uid_store_share: AtomicU64::new(0),
            disk: disk_file.map(super::disktier::ClientDisk::new),
            disk_writer: Mutex::new(None),
            disk_draining: AtomicBool::new(false),
            disk_last_refused: AtomicU64::new(0),
            disk_pause_until_ms: AtomicU64::new(0),
            children: Mutex::new(ForkedChildren::default()),
        };
        Ok((client, memfd, store_fd, disk_fd))
    }

    pub fn win(&self) -> &Window {
        &self.mapping.win
    }

    /// Where the bytes of window slot `slot` are: the monitor's arena (cross-mm backend) or
    /// the shared window (stock).
    pub fn slot_ptr(&self, slot: u32) -> *mut u8 {
        match &self.arena {
            Some(a) if self.cross_mm.load(Ordering::Relaxed) => {
                assert!((slot as usize) < a.len() / PAGE_SIZE, "slot out of range");
                // SAFETY: in bounds (checked); the arena lives as long as the client.
                unsafe { (a.as_ptr() as *mut u8).add(slot as usize * PAGE_SIZE) }
            }
            _ => self.win().slot_ptr(slot as usize),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        if self.cross_mm.load(Ordering::Relaxed) {
            "cross-mm (monitor moves)"
        } else {
            "stock (agent moves)"
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn request_agent(&self, bits: u32) {
        self.win().requests().fetch_or(bits, Ordering::AcqRel);
        signal(self.req_efd.as_raw_fd());
    }

    /// The control loop: socket messages, policy ticks, compression. Returns when the client
    /// disconnects (exit, exec) or misbehaves.
    pub fn control_loop(self: &Arc<Self>, sock: RawFd) -> anyhow::Result<()> {
        let mut buf = vec![0u8; crate::protocol::wire::MAX_MSG_LEN];
        let tick = self.cfg.tick;
        let mut next_tick = Instant::now();
        let mut last_rescan = Instant::now();
        // Regions packets in the current one-second window.
        let mut regions_window = (Instant::now(), 0u32);
        // A forked child whose parent had registered its memory registered its own before
        // it ran on; its agent keeps doing so at every scan.
        let register = if self.register_requested.load(Ordering::Relaxed) {
            shm::REQ_REGISTER
        } else {
            0
        };
        self.request_agent(shm::REQ_RESCAN | shm::REQ_RSS | register);
        loop {
            if self.closing.load(Ordering::Acquire) {
                return Ok(()); // released by the monitor (see Monitor::release_all)
            }
            let timeout = next_tick.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: sock,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one pollfd on our stack.
            let rc = unsafe {
                libc::poll(
                    &mut pfd,
                    1,
                    // Rounded up: a sub-millisecond remainder must sleep, not spin.
                    timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
                )
            };
            if rc > 0 {
                let Some(got) = recv_packet(sock, &mut buf, libc::MSG_DONTWAIT)
                    .context("reading the client's socket")?
                else {
                    return Ok(()); // end of stream: the program exited or exec'd
                };
                if got.fd_count() > 0 {
                    bail!("client sent descriptors after the handshake");
                }
                let msg =
                    Msg::decode(&buf[..got.len]).context("malformed message from the client")?;
                if matches!(msg, Msg::Regions(_)) {
                    if regions_window.0.elapsed() >= Duration::from_secs(1) {
                        regions_window = (Instant::now(), 0);
                    }
                    regions_window.1 += 1;
                    if regions_window.1 > MAX_REGIONS_PACKETS_PER_SEC {
                        bail!(
                            "Regions flood: more than {MAX_REGIONS_PACKETS_PER_SEC} Regions packets in one second"
                        );
                    }
                }
                self.handle_msg(sock, msg)?;
            }
            if Instant::now() >= next_tick {
                next_tick = Instant::now() + tick;
                if last_rescan.elapsed() >= Duration::from_millis(500) {
                    last_rescan = Instant::now();
                    self.request_agent(shm::REQ_RESCAN);
                }
                self.tick();
            }
        }
    }

    fn handle_msg(self: &Arc<Self>, sock: RawFd, msg: Msg<'_>) -> anyhow::Result<()> {
        match msg {
            Msg::Regions(r) => {
                let mut st = self.state.lock();
                let done = st.regions.feed(
                    r.snapshot,
                    r.flags & REGIONS_FIRST != 0,
                    r.flags & REGIONS_LAST != 0,
                    r.epoch,
                    r.iter(),
                    self.cfg.min_region_bytes,
                )?;
                if done {
                    debug!(
                        client = self.id,
                        managed_bytes = st.regions.managed_bytes(),
                        "region snapshot"
                    );
                }
            }
            Msg::ForkPrepare => {
                let (status, pages_restored, (token, child_member)) = match self.prepare_fork() {
                    Ok(Some(t)) => (0, 0, t),
                    // The child cannot share the store: every page goes home first, and the
                    // child runs unmanaged on a complete copy (the behaviour before fork
                    // families).
                    Ok(None) => match self.bring_all_home(FORK_WAIT) {
                        Ok(n) => (0, n, (0, NO_MEMBER)),
                        Err(e) => {
                            warn!(
                                client = self.id,
                                "bringing pages home before fork failed: {e:#}"
                            );
                            (libc::EIO, 0, (0, NO_MEMBER))
                        }
                    },
                    Err(e) => {
                        warn!(client = self.id, "preparing a fork failed: {e:#}");
                        (libc::EIO, 0, (0, NO_MEMBER))
                    }
                };
                let mut out = [0u8; 64];
                let n = Msg::ForkReady {
                    status,
                    pages_restored,
                    token,
                    child_member,
                }
                .encode(&mut out)?;
                send_packet(sock, &out[..n], &[]).context("answering ForkPrepare")?;
            }
            Msg::ForkDone { child_pid, token } => {
                if token != 0 {
                    super::die::point("fork:done");
                }
                self.state.lock().paused = false;
                self.children.lock().on_done(child_pid);
                if token != 0 {
                    self.limits.forks.fork_done(token, child_pid);
                }
            }
            Msg::Bye { .. } => {}
            other => bail!(
                "unexpected message kind {} after the handshake",
                other.kind()
            ),
        }
        Ok(())
    }

    /// Before a fork: pauses eviction (until `ForkDone`), waits for the batches in flight, and
    /// makes every evicted page of the parent a page of the child too, copy-on-write in the
    /// family store (a page cooling in the window gets a compressed copy of the child's own).
    /// Returns the snapshot's token, or `None` when the child cannot share (the family has
    /// [`crate::protocol::store_layout::MAX_OWNERS`] members, or the store is full): the
    /// caller then brings every page home instead.
    /// The pair returned is (token, the child's member index or [`NO_MEMBER`]).
    fn prepare_fork(&self) -> anyhow::Result<Option<(u64, u32)>> {
        self.children.lock().on_prepare();
        self.state.lock().paused = true;
        self.wait_batches(FORK_WAIT)?;
        self.store_window_for_fork();
        let mut st = self.state.lock();
        let evicted = st.pages.evicted_pages();
        let registered = self.register_requested.load(Ordering::Relaxed);
        if evicted.is_empty() {
            // Nothing to inherit: the child starts a family of its own.
            let snap = ForkSnapshot::new(self.id, self.pid, self.uid, None, Vec::new(), registered);
            return Ok(Some((self.limits.forks.insert(snap), NO_MEMBER)));
        }
        let Some(child) = st.store.join() else {
            info!(
                client = self.id,
                "fork: the store's family is full; bringing every page home instead"
            );
            return Ok(None);
        };
        let mut snap = ForkSnapshot::new(
            self.id,
            self.pid,
            self.uid,
            Some(child),
            Vec::with_capacity(evicted.len()),
            registered,
        );
        let mut page = Box::new([0u8; PAGE_SIZE]);
        for (addr, s) in evicted {
            let child = snap.store.as_mut().expect("set above");
            let h = match s {
                PageState::Stored(h) => match st.store.share_with(h, child) {
                    Ok(()) => h,
                    Err(e) => {
                        warn!(client = self.id, addr, "fork: sharing a stored page: {e}");
                        return Ok(None);
                    }
                },
                PageState::Window { slot, .. } => {
                    // SAFETY: the slot holds this page's bytes (its word says so, under the
                    // lock) and nothing writes it: no batch is in flight and eviction is paused.
                    let src = unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), PAGE_SIZE) };
                    page.copy_from_slice(src);
                    match child.put(&page, addr) {
                        Ok(h) => h,
                        Err(e) => {
                            warn!(client = self.id, addr, "fork: storing a cooling page: {e}");
                            return Ok(None);
                        }
                    }
                }
                PageState::Moving { .. } | PageState::Absent { .. } => {
                    warn!(client = self.id, addr, "fork: a page is still moving");
                    return Ok(None);
                }
            };
            snap.pages.push((addr, h));
        }
        let pages = snap.pages.len();
        let member = u32::from(snap.store.as_ref().expect("set above").member());
        drop(st);
        let token = self.limits.forks.insert(snap);
        info!(
            client = self.id,
            pages, "fork: the child inherits the evicted pages copy-on-write"
        );
        Counters::add(&self.counters.fork_pages_shared, pages as u64);
        Counters::add(&self.counters.forks_shared, 1);
        Ok(Some((token, member)))
    }

    /// Waits until no batch is in flight (at most `max_wait`; an agent already stalled gets
    /// `agent_timeout`).
    fn wait_batches(&self, max_wait: Duration) -> anyhow::Result<()> {
        let wait = if self.agent_stalled.load(Ordering::Relaxed) {
            max_wait.min(self.limits.agent_timeout)
        } else {
            max_wait
        };
        let deadline = Instant::now() + wait;
        loop {
            super::fault::complete_batches(self);
            if self.state.lock().inflight.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not finish its batches within {} ms",
                    wait.as_millis()
                );
            }
            if !self.program_alive() {
                bail!("the program is gone");
            }
            signal(self.req_efd.as_raw_fd());
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Pauses eviction, waits for in-flight batches, and copies every evicted page back into
    /// the program. Eviction stays paused until `ForkDone`.
    ///
    /// Waits at most `max_wait` for batches in flight.
    fn bring_all_home(&self, max_wait: Duration) -> anyhow::Result<u64> {
        self.state.lock().paused = true;
        // Pages in the window or the store go back first: the first copy also tells whether
        // the program is still there (ESRCH once its mm is gone: exit or exec). Then the
        // batches still in flight are waited for, and their pages brought back in turn.
        // An agent that has already left a batch unanswered for `agent_timeout` gets that long
        // again, not the longer wait a live agent under load may need before a fork.
        let wait = if self.agent_stalled.load(Ordering::Relaxed) {
            max_wait.min(self.limits.agent_timeout)
        } else {
            max_wait
        };
        let deadline = Instant::now() + wait;
        let mut restored = 0;
        let mut page = vec![0u8; PAGE_SIZE];
        loop {
            let mut st = self.state.lock();
            let evicted = st.pages.evicted_pages();
            let inflight = !st.inflight.is_empty();
            if evicted.is_empty() && !inflight {
                return Ok(restored);
            }
            let mut retry = false;
            for (addr, s) in evicted {
                let src: *const u8 = match s {
                    PageState::Window { slot, .. } => self.slot_ptr(slot),
                    PageState::Stored(h) => {
                        let p: &mut [u8; PAGE_SIZE] = (&mut page[..]).try_into().expect("one page");
                        st.store.get(h, p).context("reading a stored page back")?;
                        page.as_ptr()
                    }
                    _ => continue, // Moving: wait for its batch
                };
                match self.uffd.copy(addr, src, PAGE_BYTES, false) {
                    Ok(_) | Err(UffdError::Exists { .. }) => {}
                    Err(UffdError::Retry { .. }) => {
                        retry = true;
                        break;
                    }
                    Err(UffdError::TargetGone { .. }) => bail!("the program is gone"),
                    Err(e) => {
                        // Not mapped any more: the UNMAP event will drop it.
                        debug!(client = self.id, addr, "bringing a page home: {e}");
                        continue;
                    }
                }
                if let super::pages::Released::Blob(h) = st.pages.faulted_in(addr, self.now_ms()) {
                    st.store.remove(h);
                }
                restored += 1;
                Counters::add(&self.counters.pages_restored, 1);
            }
            drop(st);
            if Instant::now() > deadline {
                bail!(
                    "the agent did not finish its batches within {} ms",
                    wait.as_millis()
                );
            }
            if inflight && !self.program_alive() {
                bail!("the program is gone");
            }
            if inflight {
                signal(self.req_efd.as_raw_fd());
                std::thread::sleep(Duration::from_micros(200));
                // Completions the agent published without a signal (it stops signalling once
                // it finds its descriptors gone) are read from the window directly.
                super::fault::complete_batches(self);
            } else if retry {
                // An event is queued: the fault thread reads it; try again shortly.
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// Whether the program's address space still exists. Probes with a UFFDIO_COPY whose
    /// source is an address never mapped in the monitor (page 1, below mmap_min_addr): the
    /// kernel answers ESRCH when the mm is gone (exit, exec) and otherwise fails the copy from
    /// the source (EFAULT) or finds the page present (EEXIST) before installing anything.
    fn program_alive(&self) -> bool {
        let st = self.state.lock();
        let Some(addr) = st.regions.evictable().first().map(|r| r.start) else {
            return true;
        };
        drop(st);
        !matches!(
            self.uffd
                .copy(addr, PAGE_SIZE as *const u8, PAGE_BYTES, true),
            Err(UffdError::TargetGone { .. })
        )
    }

    /// Whether the monitor holds, or is about to hold, the only copy of some page.
    pub fn has_evicted_pages(&self) -> bool {
        super::fault::complete_batches(self);
        let c = self.state.lock().pages.counts();
        c.moving + c.window + c.stored > 0
    }

    /// Detaches from a program that is still running (a protocol error on our side or its
    /// own): every evicted page goes back into it and its ranges are unregistered, so nothing
    /// it wrote is lost and it never waits on a monitor that no longer listens.
    pub fn give_everything_back(&self) -> u64 {
        // A live agent answers a batch in milliseconds; one that has not within agent_timeout
        // (a client that hung up mid-batch, or never had an agent) is not waited for longer.
        let pages = match self.bring_all_home(self.limits.agent_timeout) {
            Ok(n) => {
                info!(
                    client = self.id,
                    pages = n,
                    "gave every evicted page back before detaching"
                );
                n
            }
            // The program exited (or exec'd) meanwhile: there is nobody to give pages to.
            Err(e) if !self.program_alive() => {
                debug!(
                    client = self.id,
                    "the program is gone before its pages went back: {e:#}"
                );
                0
            }
            Err(e) => {
                // Unregistering now would make the pages still out read as zeros. Leave the
                // program registered: when our end of the socket closes, its shim's guardian
                // brings them home from the store file and the window (their records), then
                // unregisters itself.
                warn!(
                    client = self.id,
                    "could not give every page back before detaching ({e:#}); the program's shim brings the rest home from the shared store"
                );
                return 0;
            }
        };
        // The agent unregisters every managed VMA with fresh bounds; the monitor also
        // unregisters what the last snapshot reported (a no-op where the agent already did).
        self.request_agent(shm::REQ_UNREGISTER);
        let ranges = self.state.lock().regions.ever_registered();
        for r in ranges {
            match self.uffd.unregister(r.start, r.end - r.start) {
                Ok(()) => {}
                // ESRCH, or ENOMEM (the kernel's answer when the mm is being torn down): a
                // program that died meanwhile has nothing left to unregister.
                Err(
                    e @ (UffdError::TargetGone { .. }
                    | UffdError::Os {
                        errno: libc::ENOMEM,
                        ..
                    }),
                ) if !self.program_alive() => {
                    debug!(client = self.id, "unregister: {e}: the program is gone");
                    break;
                }
                Err(e) => debug!(client = self.id, start = r.start, "unregister: {e}"),
            }
        }
        // Give the agent a moment to finish before the fault thread stops serving.
        std::thread::sleep(Duration::from_millis(100));
        self.request_agent(shm::REQ_SHUTDOWN);
        pages
    }

    /// One policy tick: trial-evict what the budget asks for, compress what has cooled.
    fn tick(&self) {
        let win = self.win();
        // Fresh RSS figure for the next tick.
        if let Some((rss_seq, sampled, done_at_read)) = win
            .read_rss()
            .filter(|&(seq, _, _)| seq != self.last_rss_seq.load(Ordering::Relaxed))
        {
            self.last_rss_seq.store(rss_seq, Ordering::Relaxed);
            // The agent reads RssAnon after the batches it has just answered: count their
            // moved pages before the sample, or the estimate takes them off twice (in the
            // TCG VM the fault thread was often batches behind, and the estimate sat ~50 MiB
            // under the truth).
            super::fault::complete_batches(self);
            // And no more than those: batches answered (and counted by the fault thread)
            // after the read must still be taken off, or the estimate stays high by what
            // eviction moved in up to a tick (~10 MiB in a seq re-read) and eviction
            // overshoots the budget's low-water mark by as much.
            let mark = {
                let st = self.state.lock();
                st.out_marks
                    .iter()
                    .find(|&&(end, _)| end == done_at_read)
                    .map(|&(_, out)| out)
            };
            match mark {
                Some(out) => self.rss.on_sample_at(sampled, out, &self.counters),
                None => self.rss.on_sample(sampled, &self.counters),
            }
            self.counters
                .rss_anon_bytes
                .store(sampled, Ordering::Relaxed);
            self.counters
                .peak_rss_anon_bytes
                .fetch_max(sampled, Ordering::Relaxed);
        }
        self.rss.on_request(&self.counters);
        self.request_agent(shm::REQ_RSS);
        // The sample a tick old, plus the monitor's own traffic since (`monitor/rss.rs`).
        let rss = self.rss.estimate_bytes(&self.counters);
        self.counters
            .fault_rate
            .sample(Counters::get(&self.counters.faults));
        if let Some(budget) = self.cfg.budget_bytes {
            let over = rss.saturating_sub(budget);
            let was = self.over_budget.load(Ordering::Relaxed);
            let now = if was {
                over > (budget / 16).max(OVER_BUDGET_MIN_BYTES / 2)
            } else {
                over > (budget / 8).max(OVER_BUDGET_MIN_BYTES)
            };
            if now != was {
                self.over_budget.store(now, Ordering::Relaxed);
                Counters::add(&self.counters.over_budget_spells, u64::from(now));
            }
        }
        let decision = self.policy_tick(rss);
        // Stock backend, while the program is half way from its budget to the throttle line
        // (a fill or a refault storm): the agent moves the next pages into the slots each
        // compressed chunk frees while this thread compresses on, so eviction runs on both
        // CPUs at once instead of in turns, and the program stays clear of the line (where
        // its faults lose prefetch and wait). This tick's posts share one rate cap. Refilling
        // at any excess made the random workload's touches a fifth slower: each post's sweep
        // holds the lock its faults need, and the program near its budget gains nothing.
        let mut evict_left_pages = self.state.lock().policy.rate_cap_pages();
        let mut posted_pages = 0;
        let refill_line = self
            .cfg
            .budget_bytes
            .filter(|_| !self.cross_mm.load(Ordering::Relaxed))
            .map(super::rss::refill_line_bytes);
        let batch_pages = u64::from(batch_pages(&self.cfg));
        let mut freed_pages = 0u64;
        let mut after_chunk = |released: u64| {
            freed_pages += released;
            let Some(refill_line) = refill_line else {
                return;
            };
            if freed_pages < batch_pages
                || evict_left_pages == 0
                || self.agent_stalled.load(Ordering::Relaxed)
            {
                return;
            }
            let rss = self.rss.estimate_bytes(&self.counters);
            if rss <= refill_line {
                return;
            }
            freed_pages = 0;
            let n = self.evict(rss, 0, evict_left_pages);
            posted_pages += n;
            evict_left_pages = evict_left_pages.saturating_sub(n);
        };
        self.compress_cooled_then(decision.cold_age_ms, &mut after_chunk);
        if self.demote_cold() {
            // Room was made: the pages the full store refused are stored now, not a tick later.
            self.compress_cooled(decision.cold_age_ms);
        }
        self.recompress_tick();
        self.compact_store();
        self.punch_store_slack();
        self.trim_window();
        self.limits.forks.sweep();
        {
            let st = self.state.lock();
            let c = st.pages.counts();
            let out_of_ram = (c.window + c.stored) * PAGE_BYTES;
            let stats = st.store.stats();
            // The store file's allocated pages (a chunk's untouched tail is not memory).
            let held = c.window * PAGE_BYTES
                + stats.resident_bytes
                + stats.metadata_bytes
                + st.pages.metadata_bytes();
            self.counters
                .peak_saved_bytes
                .fetch_max(out_of_ram.saturating_sub(held), Ordering::Relaxed);
        }
        if !self.cross_mm.load(Ordering::Relaxed) {
            self.watch_agent();
        }
        let proactive = self.state.lock().controller.proactive();
        if (self.cfg.budget_bytes.is_some() || proactive)
            && !self.agent_stalled.load(Ordering::Relaxed)
            && evict_left_pages > 0
        {
            // The estimate again: pages moved out or brought in since the tick began.
            let rss = self.rss.estimate_bytes(&self.counters);
            posted_pages += self.evict(rss, decision.proactive_pages, evict_left_pages);
        }
        // Throttle: only while eviction is under way, so holding the program back lets it
        // catch up (a paused or stalled eviction, or nothing left to evict, holds nothing).
        let under_way = !self.agent_stalled.load(Ordering::Relaxed) && {
            let st = self.state.lock();
            !st.paused && (posted_pages > 0 || !st.inflight.is_empty())
        };
        self.rss.on_tick(&self.counters, under_way, Instant::now());
        self.counters.agent_busy_ns.store(
            win.agent_busy_ns().load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.counters.pages_unshared.store(
            win.agent_unshared_pages().load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// Feeds the pressure controller this tick's counters and attributes the refaults logged
    /// since the last tick to their regions.
    fn policy_tick(&self, rss: u64) -> crate::policy::controller::Decision {
        let c = &self.counters;
        let now_ms = self.now_ms();
        let mut st = self.state.lock();
        let counts = st.pages.counts();
        let over_budget = st.policy.eviction_target_pages(rss, counts.moving) > 0;
        let before = st.controller.state();
        let decision = st.controller.update(Sample {
            now_ms,
            stall_ns: Counters::get(&c.stall_ns),
            refaults: Counters::get(&c.faults_window) + Counters::get(&c.faults_store),
            evicted_pages: counts.window + counts.stored,
            over_budget,
        });
        if decision.state != before {
            debug!(
                client = self.id,
                state = decision.state.name(),
                stall_ms_per_s = st.controller.stall_ms_per_s(),
                promotion_rate_per_min = st.controller.promotion_rate_per_min(),
                cold_age_ms = decision.cold_age_ms,
                "policy controller"
            );
        }
        let managed = st.regions.managed();
        st.region_stats.sync(&managed);
        let (refaults, dropped) = st.pages.take_refaults();
        for a in refaults {
            st.region_stats.record_refault(a);
        }
        st.region_stats.unattributed_refaults += dropped;
        decision
    }

    /// Times the oldest batch in flight: one unanswered for `agent_timeout` (a stopped,
    /// broken or hostile agent) stops eviction from this client, with a warning; eviction
    /// resumes when every batch in flight has been answered. Nothing here waits for the agent.
    fn watch_agent(&self) {
        let front = self.state.lock().inflight.front().map(|(seq, _)| *seq);
        let mut w = self.watch.lock();
        match (front, w.oldest) {
            (None, _) => {
                w.oldest = None;
                if self.agent_stalled.swap(false, Ordering::Relaxed) {
                    info!(
                        client = self.id,
                        pid = self.pid,
                        "the agent answered its batches: eviction resumes"
                    );
                }
            }
            (Some(seq), Some((old, since))) if seq == old => {
                if since.elapsed() >= self.limits.agent_timeout
                    && !self.agent_stalled.swap(true, Ordering::Relaxed)
                {
                    Counters::add(&self.counters.agent_timeouts, 1);
                    warn!(
                        client = self.id,
                        pid = self.pid,
                        seq,
                        timeout_ms = self.limits.agent_timeout.as_millis() as u64,
                        "the agent has not answered a batch in time: no more eviction from this program until it does"
                    );
                }
            }
            (Some(seq), _) => w.oldest = Some((seq, Instant::now())),
        }
    }

    /// Whether the uid's shared store quota (daemon `max_store_per_uid`) is used up.
    fn uid_store_full(&self) -> bool {
        self.limits
            .uid_store
            .as_ref()
            .is_some_and(|u| u.bytes.load(Ordering::Relaxed) + PAGE_BYTES > u.limit_bytes)
    }

    /// Publishes this client's store size into the uid's shared usage.
    pub(super) fn update_uid_store(&self, mapped_bytes: u64) {
        if let Some(u) = &self.limits.uid_store {
            let old = self.uid_store_share.swap(mapped_bytes, Ordering::Relaxed);
            if mapped_bytes >= old {
                u.bytes.fetch_add(mapped_bytes - old, Ordering::Relaxed);
            } else {
                u.bytes.fetch_sub(old - mapped_bytes, Ordering::Relaxed);
            }
        }
    }

    /// Faults bring in the faulting page alone (no fill-ahead, no prefetch): resident memory
    /// is well over the budget ([`Client::over_budget`]) or, with the throttle on, over its
    /// line. Otherwise each fault released by the throttle would still bring in up to
    /// `fill_ahead_pages` (1 MiB by default), and a program filling new memory would outrun
    /// eviction between the line and `over_budget`'s 32 MiB.
    pub(super) fn one_page_per_fault(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed)
            || self.rss.over_line(&self.counters, self.throttle_line_bytes)
    }

    /// Regions are registered by the agent, with the exact bounds of each VMA it has just
    /// read (a stale range from here could split a program mapping). Asked once; regions it
    /// reports registered become evictable with the snapshot that follows, and the agent
    /// keeps registering new regions at every scan from then on.
    fn request_registration(&self) {
        if !self.register_requested.load(Ordering::Relaxed)
            && self.state.lock().regions.any_unregistered()
        {
            self.register_requested.store(true, Ordering::Relaxed);
            self.request_agent(shm::REQ_REGISTER);
        }
    }

    /// Trial-evicts what the budget asks for (hard: at full rate, from the oldest hot pages if
    /// no cold candidate is left) or, under the budget, the controller's `proactive_pages`
    /// (cold candidates only); at most `cap_pages`, what is left of this tick's rate cap.
    /// Returns the pages posted.
    fn evict(&self, rss: u64, proactive_pages: u64, cap_pages: u64) -> u64 {
        let win = self.win();
        // Busy pages of these batches may be made the program's own again (see
        // `ForkedChildren`); not on the cross-mm backend, which moves without the agent.
        let unshare = if self.children.lock().none_alive() {
            shm::DESC_UNSHARE
        } else {
            0
        };
        {
            let st = self.state.lock();
            if st.paused
                || st.inflight.len() >= shm::RING_LEN
                || (st
                    .policy
                    .eviction_target_pages(rss, st.pages.counts().moving)
                    == 0
                    && proactive_pages == 0)
            {
                return 0;
            }
        }
        self.request_registration();
        let mut st = self.state.lock();
        if st.paused || st.inflight.len() >= shm::RING_LEN {
            return 0;
        }
        let inflight_pages = st.pages.counts().moving;
        let hard = st.policy.eviction_target_pages(rss, inflight_pages);
        // Over budget: the limit holds, hot pages included. Under it: proactive, cold only.
        let (want, over_budget) = if hard > 0 {
            (hard, true)
        } else {
            (proactive_pages, false)
        };
        let mut want = want.min(cap_pages);
        let batch_pages = batch_pages(&self.cfg) as usize;
        let mut total_posted = 0u64;
        let now_ms = self.now_ms();
        while want > 0 && st.inflight.len() < shm::RING_LEN {
            // Cross-mm moves each run without the lock: a pause (a fork, or a detach that has
            // just brought every page home) may have come in meanwhile, and a run moved after
            // it would be out of the program once its ranges are unregistered.
            if st.paused {
                break;
            }
            let free = st.pages.free_slot_count() as u64;
            let chunk = want.min(batch_pages as u64).min(free);
            if chunk == 0 {
                break;
            }
            let regions = st.regions.evictable();
            if regions.is_empty() {
                break;
            }
            let st_ref = &mut *st;
            let mut view = View::new(&mut st_ref.pages);
            let runs = st_ref.policy.sweep_with(
                now_ms,
                &regions,
                &mut view,
                SweepLimits {
                    want_pages: chunk,
                    max_scan_pages: chunk * 16 + 4096,
                    hot_fallback_pages: if over_budget { chunk } else { 0 },
                },
            );
            if runs.is_empty() {
                break;
            }
            let seq = st.next_seq;
            let mut desc_runs: Vec<shm::Run> = Vec::new();
            let mut slots_in_order = Vec::new();
            for run in runs {
                if st.regions.containing(run.addr).is_none() {
                    continue;
                }
                // Split the run where its slots stop being contiguous.
                for i in 0..run.pages as u64 {
                    let addr = run.addr + i * PAGE_BYTES;
                    let was_hot = matches!(
                        st.pages.state(addr),
                        PageState::Absent {
                            hot_since_ms: Some(_)
                        }
                    );
                    let Some(slot) = st.pages.begin_evict(addr, seq) else {
                        continue;
                    };
                    if was_hot {
                        Counters::add(&self.counters.pages_evicted_hot, 1);
                    }
                    st.region_stats.record_evicted(addr, 1);
                    super::pagetrace::rec(self.id, "post", addr, seq, slot as u64);
                    let extend = desc_runs.last().is_some_and(|r| {
                        r.addr + r.pages as u64 * PAGE_BYTES == addr
                            && r.first_slot + r.pages == slot
                    });
                    if extend {
                        desc_runs.last_mut().expect("checked").pages += 1;
                    } else if desc_runs.len() < shm::MAX_RUNS {
                        desc_runs.push(shm::Run {
                            addr,
                            pages: 1,
                            first_slot: slot,
                        });
                    } else {
                        // Out of run descriptors: give the page back.
                        st.pages.release_slot_if(slot, seq);
                        continue;
                    }
                    slots_in_order.push(slot);
                }
            }
            if desc_runs.is_empty() {
                break;
            }
            let posted = slots_in_order.len() as u64;
            total_posted += posted;
            if !over_budget {
                Counters::add(&self.counters.pages_proactive, posted);
            }
            if self.cross_mm.load(Ordering::Relaxed) {
                st.next_seq = seq + 1;
                Counters::add(&self.counters.pages_posted, posted);
                Counters::add(&self.counters.batches, 1);
                // One run per lock hold, so faults are served between runs.
                drop(st);
                self.move_out(seq, &desc_runs);
                want = want.saturating_sub(posted);
                st = self.state.lock();
                continue;
            }
            win.desc(seq).write(
                seq,
                win.epoch().load(Ordering::Acquire),
                &desc_runs,
                unshare,
            );
            st.next_seq = seq + 1;
            st.inflight.push_back((seq, slots_in_order));
            win.post_seq().store(seq + 1, Ordering::Release);
            Counters::add(&self.counters.pages_posted, posted);
            Counters::add(&self.counters.batches, 1);
            want = want.saturating_sub(posted);
        }
        drop(st);
        signal(self.req_efd.as_raw_fd());
        total_posted
    }

    /// Cross-mm backend: moves the pages of `runs` (marked `Moving` in batch `seq`) straight
    /// out of the program into their arena slots, one UFFDIO_MOVE per run, and completes them
    /// at once. Runs under the client's lock: the fault thread applies every event it reads
    /// under that lock, so an event read meanwhile is applied after these results; an event
    /// queued and unread makes the move fail with EAGAIN (the kernel's `mmap_changing`).
    fn move_out(&self, seq: u64, runs: &[shm::Run]) {
        let t0 = Instant::now();
        let mut shadow_time = Duration::ZERO;
        let mut entered: Vec<u32> = Vec::new();
        // Runs of the batch are merged where contiguous; move (and give durable copies to) at
        // most `run_pages` pages at a time, which bounds what a monitor death can lose.
        let step = self.cfg.run_pages.clamp(1, shm::INFLIGHT_MAX_PAGES);
        let win = *self.win();
        let pieces = runs.iter().flat_map(|r| {
            (0..r.pages)
                .step_by(step as usize)
                .map(move |off| shm::Run {
                    addr: r.addr + off as u64 * PAGE_BYTES,
                    pages: (r.pages - off).min(step),
                    first_slot: r.first_slot + off,
                })
        });
        for piece in pieces {
            let run = &piece;
            entered.clear();
            let mut st = self.state.lock();
            // Announce the run before any of its pages leaves the program (see
            // `Window::inflight_run`), and tell the keeper its slots.
            if let Some(k) = &self.keeper {
                k.set_inflight_first_slot(run.first_slot);
            }
            win.inflight_run()
                .store(run.addr | u64::from(run.pages), Ordering::Release);
            win.inflight_state()
                .store(shm::INFLIGHT_MOVING, Ordering::SeqCst);
            // Events applied since the run was chosen may have changed some of its pages
            // (discarded, moved): move only the sub-runs whose words are still exactly as
            // posted. Events are read and applied under this lock, so the words are current.
            let mut i = 0u32;
            while i < run.pages {
                let still = |st: &State, k: u32| {
                    st.pages.state(run.addr + k as u64 * PAGE_BYTES)
                        == PageState::Moving {
                            gen: seq & super::pages::GEN_MASK,
                            slot: run.first_slot + k,
                        }
                };
                if !still(&st, i) {
                    // Stale: completing it frees its slot and leaves the word alone.
                    count_result(&self.counters, shm::RESULT_CANCELLED);
                    st.pages
                        .complete(run.first_slot + i, seq, false, self.now_ms(), false);
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < run.pages && still(&st, j) {
                    j += 1;
                }
                let sub = shm::Run {
                    addr: run.addr + i as u64 * PAGE_BYTES,
                    pages: j - i,
                    first_slot: run.first_slot + i,
                };
                self.move_run_out(&mut st, seq, &sub, &mut entered);
                i = j;
            }
            drop(st);
            let moved_bits = entered
                .iter()
                .map(|&slot| 1u64 << (slot - run.first_slot))
                .fold(0, |a, b| a | b);
            win.inflight_moved().store(moved_bits, Ordering::Release);
            win.inflight_state()
                .store(shm::INFLIGHT_MOVED, Ordering::SeqCst);
            let t_shadow = Instant::now();
            self.store_shadows(seq, &entered);
            shadow_time += t_shadow.elapsed();
            win.inflight_state()
                .store(shm::INFLIGHT_NONE, Ordering::SeqCst);
        }
        Counters::add(
            &self.counters.move_out_ns,
            t0.elapsed().saturating_sub(shadow_time).as_nanos() as u64,
        );
        // Faults parked on these pages (there are none unless a fault raced the run) retry.
        signal(self.cmd_efd.as_raw_fd());
    }

    /// Moves one run whose words are all still `Moving` as posted, and completes its pages;
    /// appends the slots of the pages that entered the window to `entered`.
    fn move_run_out(&self, st: &mut State, seq: u64, run: &shm::Run, entered: &mut Vec<u32>) {
        let now_ms = self.now_ms();
        let mode = crate::uffd::sys::UFFDIO_MOVE_MODE_CROSS_MM_OUT
            | crate::uffd::sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
        let pages = run.pages as usize;
        let dst = self.slot_ptr(run.first_slot) as u64;
        // The slots may still hold a page (copied back rather than moved, or dropped):
        // a move needs empty destinations.
        // SAFETY: advising our own arena pages; no reference to them is held.
        unsafe { libc::madvise(dst as *mut _, pages * PAGE_SIZE, libc::MADV_DONTNEED) };
        let mut results = vec![shm::RESULT_PENDING; pages];
        let mut off = 0usize;
        while off < pages {
            let at = (off * PAGE_SIZE) as u64;
            let len = ((pages - off) * PAGE_SIZE) as u64;
            match self.uffd.move_pages(dst + at, run.addr + at, len, mode) {
                Ok(n) => off += (n as usize).div_ceil(PAGE_SIZE).max(1),
                Err(e) => {
                    off += e.done_bytes() as usize / PAGE_SIZE;
                    if off >= pages {
                        break;
                    }
                    match e {
                        // Shared (fork, KSM), pinned, swapped out, or charged to another
                        // memcg: the kernel keeps it.
                        UffdError::Busy { .. }
                        | UffdError::Os {
                            errno: libc::EXDEV, ..
                        } => {
                            results[off] = shm::RESULT_BUSY;
                            off += 1;
                        }
                        UffdError::Retry { .. } => {
                            results[off..].fill(shm::RESULT_CANCELLED);
                            break;
                        }
                        // A range the kernel will not take in one piece (it spans two
                        // VMAs, e.g. after a split the last snapshot did not show yet):
                        // move this page alone, then go on.
                        UffdError::Os {
                            errno: libc::EINVAL,
                            ..
                        } if pages - off > 1 => {
                            let at = (off * PAGE_SIZE) as u64;
                            match self
                                .uffd
                                .move_pages(dst + at, run.addr + at, PAGE_BYTES, mode)
                            {
                                Ok(_) => {}
                                Err(UffdError::Busy { .. }) => results[off] = shm::RESULT_BUSY,
                                Err(e) => {
                                    debug!(
                                        client = self.id,
                                        addr = run.addr + at,
                                        "cross-mm move: {e}"
                                    );
                                    results[off] = shm::RESULT_FAILED;
                                }
                            }
                            off += 1;
                        }
                        _ => {
                            debug!(client = self.id, addr = run.addr, "cross-mm move: {e}");
                            results[off] = shm::RESULT_FAILED;
                            off += 1;
                        }
                    }
                }
            }
        }
        // Which slots now hold a page: holes (never touched, or gone) stay empty.
        let mut residency = vec![0u8; pages];
        // SAFETY: mincore on our own arena range into a buffer of one byte per page.
        let rc = unsafe { libc::mincore(dst as *mut _, pages * PAGE_SIZE, residency.as_mut_ptr()) };
        for (i, r) in results.iter_mut().enumerate() {
            if *r == shm::RESULT_PENDING {
                *r = if rc != 0 || residency[i] & 1 != 0 {
                    shm::RESULT_MOVED
                } else {
                    shm::RESULT_HOLE
                };
            }
        }
        for (i, &r) in results.iter().enumerate() {
            count_result(&self.counters, r);
            let slot = run.first_slot + i as u32;
            if st.pages.complete(
                slot,
                seq,
                r == shm::RESULT_MOVED,
                now_ms,
                r == shm::RESULT_BUSY,
            ) {
                entered.push(slot);
            }
        }
    }

    /// Cross-mm: pages moved into the arena live only in the monitor's private memory, which
    /// dies with it. Each gets a durable copy in the store (its shadow) at once: compressed
    /// without the lock, placed under it. While it cools, a fault still moves the arena page
    /// back (zero-copy) and frees the shadow; once cooled, the shadow simply becomes its
    /// stored copy. The window in which a page exists only in the monitor is therefore one
    /// run's compression (see DESIGN.md, "The monitor dies").
    fn store_shadows(&self, seq: u64, slots: &[u32]) {
        if slots.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let mut scratch = Vec::new();
        let mut arena: Vec<u8> = Vec::new();
        let mut outs: Vec<(u32, Compressed)> = Vec::with_capacity(slots.len());
        for &slot in slots {
            // The slot is stable (only this thread reuses slots); a fault may move the page
            // back meanwhile, which `set_shadow` notices under the lock.
            outs.push((
                slot,
                Compressed::of(self.slot_page(slot), &mut scratch, &mut arena),
            ));
        }
        let mut st = self.state.lock();
        for &(slot, c) in &outs {
            let Some(owner) = st.pages.slot_owner(slot, seq) else {
                continue;
            };
            let page = self.slot_page(slot);
            match st.store.insert(c.encoded(&arena), page, owner) {
                Ok(h) => {
                    if let Err(h) = st.pages.set_shadow(slot, seq, h) {
                        st.store.remove(h); // moved back or discarded meanwhile
                    }
                }
                Err(e) => {
                    // Over quota: the page stays in the arena without a durable copy until it
                    // cools (counted; it is lost only if the monitor dies before then).
                    Counters::add(&self.counters.pages_unshadowed, 1);
                    debug!(client = self.id, "no shadow for an arena page: {e}");
                }
            }
        }
        drop(st);
        let ns = t0.elapsed().as_nanos() as u64;
        Counters::add(&self.counters.shadow_ns, ns);
        Counters::add(&self.counters.shadow_runs, 1);
        self.counters.shadow_max_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// Compresses pages that have cooled in the window (or must leave it under pressure).
    /// Pages untouched in the window for `cold_age_ms` (the controller's cold age, at least
    /// `cooling`) are cold.
    pub(super) fn compress_cooled(&self, cold_age_ms: u64) {
        self.compress_cooled_then(cold_age_ms, &mut |_| ());
    }

    /// [`Self::compress_cooled`], calling `after_chunk` with the slots each chunk gave back,
    /// without the client's lock held.
    fn compress_cooled_then(&self, cold_age_ms: u64, after_chunk: &mut dyn FnMut(u64)) {
        let now_ms = self.now_ms();
        let cooling_ms = cold_age_ms;
        let mut todo = Vec::new();
        {
            let mut st = self.state.lock();
            let min_free = st.pages.slot_count() * 3 / 4;
            st.pages.pop_cooled(
                now_ms.saturating_sub(cooling_ms),
                min_free.max(shm::MAX_BATCH_PAGES),
                8192,
                &mut todo,
            );
        }
        if todo.is_empty() {
            return;
        }
        let t0 = Instant::now();
        let mut scratch = Vec::new();
        // Compression runs without the client's lock (the fault path never waits for it);
        // only placing the results in the store and the page map takes the lock, per chunk.
        let mut arena: Vec<u8> = Vec::new();
        let mut outs: Vec<(u32, u64, Compressed)> = Vec::new();
        let mut released: Vec<u32> = Vec::new();
        if self.cross_mm.load(Ordering::Relaxed) {
            // Pages with a shadow are stored already: no compression.
            let mut st = self.state.lock();
            todo.retain(|&(_addr, slot, gen)| {
                if st.pages.commit_shadow(slot, gen) {
                    Counters::add(&self.counters.pages_compressed, 1);
                    released.push(slot);
                    false
                } else {
                    true
                }
            });
            drop(st);
            for &slot in &released {
                // SAFETY: advising one page of our own arena; no reference to it is held.
                unsafe {
                    libc::madvise(self.slot_ptr(slot).cast(), PAGE_SIZE, libc::MADV_DONTNEED)
                };
            }
            released.clear();
        }
        // With a disk tier a full store is made room in after this pass (`demote_cold`): the
        // pages it refuses stay cooled, at the front of the window's FIFO, and no more are
        // compressed in vain this pass.
        let disk_tier = self.disk.is_some();
        let mut refill_time = Duration::ZERO;
        let mut ptrs: Vec<*const [u8; PAGE_SIZE]> = Vec::new();
        for (chunk_idx, chunk) in todo.chunks(256).enumerate() {
            let mut refused_full = false;
            arena.clear();
            outs.clear();
            // The slots are stable: only this thread reuses slots, and a fault that takes the
            // page back only frees it.
            ptrs.clear();
            ptrs.extend(
                chunk
                    .iter()
                    .map(|&(_, slot, _)| self.slot_page(slot) as *const _),
            );
            let encoded = match &self.limits.compress {
                // SAFETY: window slots stay mapped for the client's life and are written only
                // when this thread reuses them, which it does not while this call runs.
                Some(pool) => unsafe { pool.compress(&ptrs, &mut scratch, &mut arena) },
                None => chunk
                    .iter()
                    .map(|&(_, slot, _)| {
                        Compressed::of(self.slot_page(slot), &mut scratch, &mut arena)
                    })
                    .collect(),
            };
            outs.extend(
                chunk
                    .iter()
                    .zip(encoded)
                    .map(|(&(_addr, slot, gen), c)| (slot, gen, c)),
            );
            let mut st = self.state.lock();
            // The uid's quota is checked per chunk (it may be passed by at most one chunk's
            // worth of slab growth: 256 pages).
            let uid_full = self.uid_store_full();
            for &(slot, gen, c) in &outs {
                let page = self.slot_page(slot);
                if uid_full {
                    Counters::add(&self.counters.pages_store_full, 1);
                    Counters::add(&self.counters.pages_uid_quota_full, 1);
                    st.pages.requeue(slot, gen, now_ms);
                    continue;
                }
                let (enc, out_len) = (c.encoded(&arena), c.out_bytes());
                let Some(owner) = st.pages.slot_owner(slot, gen) else {
                    // Faulted in or discarded meanwhile: its slot was freed with it.
                    continue;
                };
                match st.store.insert(enc, page, owner) {
                    Ok(h) => {
                        Counters::add(&self.counters.compressed_bytes_in, PAGE_BYTES);
                        Counters::add(&self.counters.compressed_bytes_out, out_len);
                        let committed = st.pages.commit_stored(slot, gen, h);
                        super::pagetrace::rec(
                            self.id,
                            "stored",
                            owner,
                            gen,
                            committed.is_ok() as u64,
                        );
                        match committed {
                            Ok(()) => {
                                Counters::add(&self.counters.pages_compressed, 1);
                                released.push(slot);
                            }
                            Err(h) => st.store.remove(h), // faulted in or discarded meanwhile
                        }
                    }
                    Err(e) => {
                        // Full (quota) or unmappable: the page stays in the window and is tried
                        // again later; nothing is lost.
                        let full = matches!(e, crate::store::StoreError::Full);
                        if full {
                            Counters::add(&self.counters.pages_store_full, 1);
                        } else {
                            warn!(client = self.id, "store insert failed: {e}");
                        }
                        if full && disk_tier {
                            refused_full = true;
                            st.pages.requeue_cooled(slot, gen);
                        } else {
                            st.pages.requeue(slot, gen, now_ms);
                        }
                    }
                }
            }
            if refused_full {
                let rest = todo.len().min((chunk_idx + 1) * 256);
                for &(_addr, slot, gen) in todo[rest..].iter().rev() {
                    st.pages.requeue_cooled(slot, gen);
                }
            }
            if self.limits.uid_store.is_some() {
                let mapped = st.store.stats().slab_bytes_mapped;
                self.update_uid_store(mapped);
            }
            drop(st);
            // Cross-mm: a stored page's arena page is ours; give it back to the system. Only
            // this thread reuses slots, so none of these is in use again yet.
            if self.cross_mm.load(Ordering::Relaxed) {
                for &slot in &released {
                    // SAFETY: advising one page of our own arena; no reference to it is held.
                    unsafe {
                        libc::madvise(self.slot_ptr(slot).cast(), PAGE_SIZE, libc::MADV_DONTNEED)
                    };
                }
            }
            let released_pages = released.len() as u64;
            released.clear();
            if refused_full {
                break;
            }
            let t_refill = Instant::now();
            after_chunk(released_pages);
            refill_time += t_refill.elapsed();
        }
        Counters::add(
            &self.counters.compress_ns,
            t0.elapsed().saturating_sub(refill_time).as_nanos() as u64,
        );
    }

    /// Stock backend: gives back the memory of free window slots beyond a reserve of 4 MiB
    /// (none when the window is empty), highest first. The shared window is a memfd and a
    /// freed slot keeps its page until punched; this way the window holds about its pages in
    /// use plus the reserve, not its high-water mark. Runs on the control thread, the only one
    /// that takes slots, so no slot in a run is taken meanwhile; a fault reads a slot only
    /// while it is in use.
    ///
    /// The punching runs without the client's lock: it takes milliseconds for a few MiB (the
    /// shmem pages are freed one by one), and a fault waiting for the lock that long was most
    /// of the p99.9 of a random workload (BENCHMARKS.md, "Lock holds on the control thread").
    fn trim_window(&self) {
        if self.cross_mm.load(Ordering::Relaxed) {
            return; // the arena's stored slots are given back as they are stored
        }
        let runs = {
            let st = self.state.lock();
            // Only eviction at work keeps a reserve: with nothing moving in and no eviction
            // under way at the last tick, a program at rest is held at its store and its
            // cooling pages alone.
            let counts = st.pages.counts();
            let reserve = if counts.moving == 0 && !self.rss.was_under_way() {
                0
            } else {
                WINDOW_TRIM_RESERVE_SLOTS
            };
            st.pages
                .trimmable_runs(reserve, WINDOW_TRIM_MIN_SLOTS, WINDOW_TRIM_MAX_SLOTS)
        };
        let mut done = Vec::with_capacity(runs.len());
        for run in runs {
            let ptr = self.slot_ptr(run.start);
            let len_bytes = (run.end - run.start) as usize * PAGE_SIZE;
            // SAFETY: the run is whole slots of the window mapping (slot_ptr asserts the start
            // is a slot; the end is at most the slot count), all free when it was chosen: no
            // page of the program lives there, and none is taken before this returns (slots
            // are taken only by this thread, in `evict`). A fault only frees slots meanwhile.
            // MADV_REMOVE frees the memfd's pages behind them.
            let rc = unsafe { libc::madvise(ptr.cast(), len_bytes, libc::MADV_REMOVE) };
            if rc != 0 {
                debug!(
                    client = self.id,
                    error = %std::io::Error::last_os_error(),
                    "window trim failed"
                );
                break;
            }
            Counters::add(&self.counters.window_trimmed_bytes, len_bytes as u64);
            done.push(run);
        }
        if !done.is_empty() {
            let mut st = self.state.lock();
            for run in done {
                st.pages.trimmed(run);
            }
        }
    }

    /// Memory the window (stock) or the arena (cross-mm) holds now: its resident pages
    /// (`mincore`), in bytes.
    pub fn window_resident_bytes(&self) -> u64 {
        let slots = self.state.lock().pages.slot_count();
        let len_bytes = slots * PAGE_SIZE;
        let mut vec = vec![0u8; slots];
        // SAFETY: the slots are one contiguous mapping of `slots` pages starting at slot 0's
        // page (window or arena), alive as long as the client; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(self.slot_ptr(0).cast(), len_bytes, vec.as_mut_ptr()) };
        if rc != 0 {
            return 0;
        }
        vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_BYTES
    }

    /// The bytes of window slot `slot`.
    fn slot_page(&self, slot: u32) -> &[u8; PAGE_SIZE] {
        // SAFETY: the slot pointer lies inside the window mapping, valid for PAGE_SIZE bytes
        // for as long as the client (and so the mapping) lives.
        unsafe { &*(self.slot_ptr(slot) as *const [u8; PAGE_SIZE]) }
    }

    pub fn report(&self, alive: bool) -> ClientReport {
        // (Takes the client's lock itself.)
        let window_resident_bytes = if alive {
            self.window_resident_bytes()
        } else {
            0
        };
        let st = self.state.lock();
        let counts = st.pages.counts();
        let store = st.store.stats();
        let stored = store.pages();
        let disk_dir = st.store.lock().disk_dir().map(|d| d.display().to_string());
        let c = &self.counters;
        let g = Counters::get;
        ClientReport {
            id: self.id,
            pid: self.pid,
            uid: self.uid,
            name: self.name.clone(),
            alive,
            backend: self.backend_name().into(),
            budget_bytes: self.cfg.budget_bytes,
            rss_anon_bytes: g(&c.rss_anon_bytes),
            peak_rss_anon_bytes: g(&c.peak_rss_anon_bytes),
            managed_bytes: st.regions.managed_bytes(),
            pages_in_flight: counts.moving,
            pages_in_window: counts.window,
            pages_stored: counts.stored,
            window_bytes: (st.pages.slot_count() * PAGE_SIZE) as u64,
            faults: g(&c.faults),
            fault_rate_per_s: if alive { c.fault_rate.per_s() } else { 0.0 },
            faults_zero: g(&c.faults_zero),
            faults_window: g(&c.faults_window),
            faults_store: g(&c.faults_store),
            faults_waited: g(&c.faults_waited),
            faults_retried: g(&c.faults_retried),
            pages_posted: g(&c.pages_posted),
            pages_evicted: g(&c.pages_moved),
            pages_restored: g(&c.pages_restored),
            forks_shared: g(&c.forks_shared),
            fork_pages_shared: g(&c.fork_pages_shared),
            forked_from: self.forked_from,
            adopted: self.adopted,
            store_member: u32::from(st.store.member()),
            pages_moved_in: g(&c.pages_moved_in),
            pages_prefetched: g(&c.pages_prefetched),
            pages_holes: g(&c.pages_holes),
            pages_unevictable: g(&c.pages_busy),
            pages_unshared: g(&c.pages_unshared),
            pages_failed: g(&c.pages_failed),
            pages_cancelled: g(&c.pages_cancelled),
            pages_discarded: g(&c.pages_discarded),
            pages_compressed: g(&c.pages_compressed),
            pages_store_full: g(&c.pages_store_full),
            pages_uid_quota_full: g(&c.pages_uid_quota_full),
            agent_timeouts: g(&c.agent_timeouts),
            agent_stalled: self.agent_stalled.load(Ordering::Relaxed),
            events_remove: g(&c.events_remove),
            events_unmap: g(&c.events_unmap),
            events_remap: g(&c.events_remap),
            compression_ratio: {
                let (i, o) = (g(&c.compressed_bytes_in), g(&c.compressed_bytes_out));
                if o == 0 {
                    if i == 0 {
                        0.0
                    } else {
                        f64::INFINITY.min(i as f64)
                    }
                } else {
                    i as f64 / o as f64
                }
            },
            peak_saved_bytes: g(&c.peak_saved_bytes),
            compressed_bytes_in: g(&c.compressed_bytes_in),
            compressed_bytes_out: g(&c.compressed_bytes_out),
            metadata_bytes_per_stored_page: if stored == 0 {
                0.0
            } else {
                (st.pages.metadata_bytes() + store.metadata_bytes) as f64 / stored as f64
            },
            fault_latency: Percentiles::of(&self.latency.fault_ns.lock()),
            agent_wait_latency: Percentiles::of(&self.latency.wait_ns.lock()),
            monitor_compress_cpu_s: g(&c.compress_ns) as f64 / 1e9,
            monitor_fault_service_s: g(&c.fault_service_ns) as f64 / 1e9,
            policy: PolicyReport {
                controller_state: st.controller.state().name().into(),
                stall_ms_per_s: if alive {
                    st.controller.stall_ms_per_s()
                } else {
                    0.0
                },
                stall_s: g(&c.stall_ns) as f64 / 1e9,
                stall_target_ms_per_s: self.cfg.stall_target_per_sec.as_secs_f64() * 1e3,
                promotion_rate_per_min: st.controller.promotion_rate_per_min(),
                promotion_slo_per_min: self.cfg.promotion_slo_per_min,
                cold_age_ms: st.controller.cold_age_ms(),
                pages_evicted_hot: g(&c.pages_evicted_hot),
                pages_proactive: g(&c.pages_proactive),
                regions: st.region_stats.top(4),
            },
            agent_cpu_s: g(&c.agent_busy_ns) as f64 / 1e9,
            monitor_move_out_s: g(&c.move_out_ns) as f64 / 1e9,
            monitor_shadow_s: g(&c.shadow_ns) as f64 / 1e9,
            compact_s: g(&c.compact_ns) as f64 / 1e9,
            window_resident_bytes,
            window_trimmed_bytes: g(&c.window_trimmed_bytes),
            over_budget_spells: g(&c.over_budget_spells),
            faults_throttled: g(&c.faults_throttled),
            throttle_s: g(&c.throttle_ns) as f64 / 1e9,
            compact_max_us: g(&c.compact_max_ns) as f64 / 1e3,
            recompress_offered: g(&c.recompress_offered),
            recompress_cpu_s: g(&c.recompress_ns) as f64 / 1e9,
            recompress_max_hold_us: g(&c.recompress_max_hold_ns) as f64 / 1e3,
            shadow_runs: g(&c.shadow_runs),
            shadow_max_us: g(&c.shadow_max_ns) as f64 / 1e3,
            pages_unshadowed: g(&c.pages_unshadowed),
            monitor_cpu_s: (g(&c.fault_thread_cpu_ns) + g(&c.control_thread_cpu_ns)) as f64 / 1e9,
            fault_path: c.fault_path_report(),
            disk: c.disk_report(
                disk_dir,
                &store,
                Percentiles::of(&self.latency.disk_fault_ns.lock()),
            ),
            store,
        }
    }

    pub fn log_summary(&self) {
        let r = self.report(false);
        info!(client = self.id, name = %self.name, backend = self.backend_name(), evicted = r.pages_evicted, restored = r.pages_restored, moved_in = r.pages_moved_in, faults = r.faults, "client detached");
    }
}

/// The clock hand's view of the page map. The hand walks addresses in order, so the words of
/// the current 512-page chunk are copied once instead of looking each page up.
struct View<'a> {
    pages: &'a mut Pages,
    chunk_base: std::cell::Cell<u64>,
    words: std::cell::RefCell<[u64; super::pages::CHUNK_PAGES]>,
}

impl<'a> View<'a> {
    fn new(pages: &'a mut Pages) -> Self {
        View {
            pages,
            chunk_base: std::cell::Cell::new(u64::MAX),
            words: std::cell::RefCell::new([0; super::pages::CHUNK_PAGES]),
        }
    }

    fn state(&self, addr: u64) -> PageState {
        let base = addr & !(super::pages::CHUNK_BYTES - 1);
        let mut words = self.words.borrow_mut();
        if self.chunk_base.get() != base {
            match self.pages.chunk_words(base) {
                Some(w) => *words = *w,
                None => *words = [0; super::pages::CHUNK_PAGES],
            }
            self.chunk_base.set(base);
        }
        Pages::decode_word(words[((addr - base) / PAGE_BYTES) as usize])
    }
}

impl PageView for View<'_> {
    fn class(&self, page_addr: u64) -> PageClass {
        match self.state(page_addr) {
            PageState::Absent { hot_since_ms: None } => PageClass::Candidate,
            PageState::Absent {
                hot_since_ms: Some(ms),
            } => PageClass::Hot { since_ms: ms },
            _ => PageClass::Busy,
        }
    }
    fn clear_hot(&mut self, page_addr: u64) {
        self.pages.clear_hot(page_addr);
        let base = page_addr & !(super::pages::CHUNK_BYTES - 1);
        if self.chunk_base.get() == base {
            // The cleared word now reads as a plain Absent page: 0.
            self.words.borrow_mut()[((page_addr - base) / PAGE_BYTES) as usize] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real child process: alive while it sleeps, not once it has exited (a pidfd is
    /// readable from its exit on, before it is reaped); a prepared fork counts until its
    /// `ForkDone` names the child or says it failed.
    #[test]
    fn forked_children_alive_until_they_exit() {
        let mut c = ForkedChildren::default();
        assert!(c.none_alive());
        c.on_prepare();
        assert!(!c.none_alive(), "a prepared fork's child is unknown: alive");
        c.on_done(FORK_FAILED);
        assert!(c.none_alive());

        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        c.on_prepare();
        c.on_done(0);
        assert!(!c.none_alive(), "the resume alone says nothing");
        c.on_done(child.id());
        assert!(!c.none_alive(), "the child sleeps");
        child.kill().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !c.none_alive() {
            assert!(
                Instant::now() < end,
                "the killed child still counts as alive"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
        assert!(c.none_alive());

        // A child the program reaped before its `ForkDone` was read: gone, not unknown.
        let mut child = std::process::Command::new("true").spawn().expect("true");
        let pid = child.id();
        child.wait().unwrap();
        c.on_prepare();
        c.on_done(pid);
        assert!(c.none_alive(), "a reaped child counts as alive");
    }
}
