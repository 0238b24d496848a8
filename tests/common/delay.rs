//! A fixed one-way delay for the packets leaving a network namespace through one device,
//! done in userspace because this kernel has no `netem`: an iptables rule hands the
//! packets to an NFQUEUE, a thread of the test process that has moved itself into the
//! namespace holds each one in a FIFO, and lets it go on (an ACCEPT verdict) once its
//! delay has passed. Verdicts are given in arrival order, so nothing is reordered.
//!
//! The netfilter-queue protocol is spoken directly over a netlink socket (a handful of
//! fixed-layout messages from `linux/netfilter/nfnetlink_queue.h`). The `nfq` crate would
//! do the same, but it keeps its socket private, so a thread blocked in its `recv` could
//! neither wake up when the next held packet is due nor be told to stop.
//!
//! Only the packet's metadata is copied to userspace (the packet stays in the kernel), so
//! the cost per packet is two small netlink messages, whatever the packet's size.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
};
use nix::sys::time::TimeSpec;

/// Packets the kernel keeps for one queue (those not yet read plus those held in the FIFO)
/// before it drops new ones: at 1000 packets/s that allows delays up to 4 s.
const QUEUE_MAX_LEN: u32 = 4096;

/// The socket's receive buffer: room for thousands of waiting packet messages (each about
/// 1 kB of kernel memory) should the thread be descheduled for a while on a busy machine.
/// Forced past `net.core.rmem_max`, which the test process may do as root.
const RECV_BUFFER: usize = 4 << 20;

/// How long the kernel may take to acknowledge a configuration message.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(5);

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
/// An attribute's type without the NLA_F_NESTED and NLA_F_NET_BYTEORDER flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/netfilter/nfnetlink.h: a message's type is its subsystem << 8 | the message, and
// its body starts with a `struct nfgenmsg` (family, version, big-endian resource id: here
// the queue number).
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFGENMSG_LEN: usize = 4;

// linux/netfilter/nfnetlink_queue.h
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
// linux/netfilter.h
const NF_ACCEPT: u32 = 1;

/// Delays the packets queued to one NFQUEUE of one namespace until dropped (or
/// [`Delayer::stop`]ped); packets it holds then are let go at once.
pub struct Delayer {
    /// Closed to stop the thread: its end then reads as end-of-file, which wakes its poll.
    stop: Option<UnixStream>,
    /// Returns the kernel's drop counts, read just before the queue closes.
    thread: Option<JoinHandle<io::Result<(u64, u64)>>>,
    counters: Arc<Counters>,
    kernel_stats: Arc<KernelStats>,
}

#[derive(Default)]
struct Counters {
    realtime: AtomicBool,
    delayed: AtomicU64,
    /// Nanoseconds.
    max_late: AtomicU64,
    late_over_1ms: AtomicU64,
    recv_overflows: AtomicU64,
    verdict_errors: AtomicU64,
}

/// What a [`Delayer`] has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whether the thread runs with real-time priority (see `make_realtime`).
    pub realtime: bool,
    /// Packets let through after their delay.
    pub delayed: u64,
    /// The most a packet was let go after its due time: how late the thread woke up (a
    /// busy machine), the delayer's share of the jitter.
    pub max_late: Duration,
    /// Packets let go more than 1 ms after their due time.
    pub late_over_1ms: u64,
    /// Packets the kernel dropped because the queue already held `QUEUE_MAX_LEN`.
    pub queue_dropped: u64,
    /// Packets the kernel dropped because the socket's receive buffer was full.
    pub user_dropped: u64,
    /// Times the socket said it had lost messages that way (ENOBUFS).
    pub recv_overflows: u64,
    /// Verdicts the kernel refused (e.g. for a packet id it does not hold).
    pub verdict_errors: u64,
}

impl Stats {
    /// Packets lost (dropped by the kernel) on account of the delayer.
    pub fn dropped(&self) -> u64 {
        self.queue_dropped + self.user_dropped
    }
}

impl Delayer {
    /// Starts delaying the packets of queue `queue_num` in the namespace `netns` (a name
    /// under /run/netns, as `ip netns add` makes) by `delay`. Returns once the queue is
    /// bound: install the rule sending packets to it after this (see [`install_rule`]).
    pub fn start(netns: &str, queue_num: u16, delay: Duration) -> io::Result<Delayer> {
        let ns = File::open(Path::new("/run/netns").join(netns))?;
        let (stop, stop_seen) = UnixStream::pair()?;
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name(format!("delay-{netns}-q{queue_num}"))
            .spawn(move || {
                // setns moves this thread only; the rest of the test process stays put.
                let setup = setns(&ns, CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| Queue::bind(queue_num, delay))
                    .and_then(|queue| Ok((queue, Arc::new(KernelStats::open(queue_num)?))));
                drop(ns);
                let (mut queue, kernel_stats) = match setup {
                    Ok(ready) => ready,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return Ok((0, 0));
                    }
                };
                thread_counters
                    .realtime
                    .store(make_realtime(), Ordering::Relaxed);
                if ready_tx.send(Ok(Arc::clone(&kernel_stats))).is_err() {
                    return Ok((0, 0)); // start() is gone: nobody to delay for
                }
                let result = queue.run(&stop_seen, &thread_counters);
                // The kernel forgets the counts when the socket closes (dropping `queue`).
                let drops = kernel_stats.drops()?;
                result.map(|()| drops)
            })?;
        match ready_rx.recv() {
            Ok(Ok(kernel_stats)) => Ok(Delayer {
                stop: Some(stop),
                thread: Some(thread),
                counters,
                kernel_stats,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("the delay thread died while starting"))
            }
        }
    }

    /// The counts so far, the kernel's included.
    pub fn stats(&self) -> io::Result<Stats> {
        let (queue_dropped, user_dropped) = self.kernel_stats.drops()?;
        Ok(Stats {
            queue_dropped,
            user_dropped,
            ..self.own_stats()
        })
    }

    /// Stops, letting every packet go on, and says what was done in all; fails if the
    /// thread had stopped early on an error (packets then bypassed the queue, given
    /// `--queue-bypass`).
    pub fn stop(mut self) -> io::Result<Stats> {
        let (queue_dropped, user_dropped) = self.shutdown()?;
        Ok(Stats {
            queue_dropped,
            user_dropped,
            ..self.own_stats()
        })
    }

    fn own_stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            realtime: c.realtime.load(Ordering::Relaxed),
            delayed: c.delayed.load(Ordering::Relaxed),
            max_late: Duration::from_nanos(c.max_late.load(Ordering::Relaxed)),
            late_over_1ms: c.late_over_1ms.load(Ordering::Relaxed),
            recv_overflows: c.recv_overflows.load(Ordering::Relaxed),
            verdict_errors: c.verdict_errors.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }

    fn shutdown(&mut self) -> io::Result<(u64, u64)> {
        drop(self.stop.take());
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| io::Error::other("the delay thread panicked"))?,
            None => Ok((0, 0)),
        }
    }
}

impl Drop for Delayer {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("delayer of queue {}: {e}", self.kernel_stats.queue_num);
        }
    }
}

/// The kernel's table of the namespace's queues, `/proc/net/netfilter/nfnetlink_queue`,
/// opened by the delay thread from inside the namespace: the open file stays bound to
/// it, so any thread can read it later.
struct KernelStats {
    file: Mutex<File>,
    queue_num: u16,
}

impl KernelStats {
    fn open(queue_num: u16) -> io::Result<KernelStats> {
        let file = File::open("/proc/thread-self/net/netfilter/nfnetlink_queue")?;
        Ok(KernelStats {
            file: Mutex::new(file),
            queue_num,
        })
    }

    /// The queue's `queue_dropped` and `user_dropped`; zeros once the queue is unbound
    /// (its line is gone then).
    fn drops(&self) -> io::Result<(u64, u64)> {
        let mut file = self
            .file
            .lock()
            .map_err(|_| io::Error::other("kernel stats lock poisoned"))?;
        file.seek(SeekFrom::Start(0))?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Ok(parse_kernel_stats(&text, self.queue_num).unwrap_or((0, 0)))
    }
}

/// Gives the calling thread real-time priority (SCHED_FIFO 10), best effort: on a busy
/// machine (a parallel build) an ordinary thread can wake up milliseconds late, which
/// would be jitter on the delayed link. It costs the rest little: the thread sleeps but
/// for a few microseconds per packet. Done with `chrt` (util-linux, always installed on
/// Debian) because changing a thread's scheduling policy has no safe Rust API.
fn make_realtime() -> bool {
    let tid = nix::unistd::gettid().to_string();
    Command::new("chrt")
        .args(["--fifo", "--pid", "10", &tid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Reads one queue's drop counters from `/proc/net/netfilter/nfnetlink_queue`, whose lines
/// are: queue, port id, packets waiting, copy mode, copy range, queue_dropped,
/// user_dropped, last packet id, 1.
fn parse_kernel_stats(text: &str, queue_num: u16) -> Option<(u64, u64)> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.first()?.parse::<u16>().ok()? != queue_num {
            return None;
        }
        Some((fields.get(5)?.parse().ok()?, fields.get(6)?.parse().ok()?))
    })
}

/// The iptables arguments that send every packet leaving through `dev` to queue
/// `queue_num`, for `iptables -t mangle -A POSTROUTING ...` (or `-D` to remove it).
///
/// Why mangle/POSTROUTING: it sees both forwarded packets and those the namespace sends
/// itself, and comes after the filter table, so the loss and outage rules there (in
/// FORWARD) drop first and dropped packets never take queue room. An accepted packet goes
/// on to the next hook, i.e. NAT and then the device's qdisc (a `tbf` rate limit applies
/// after the delay). It must be the last rule of its chain: rules after an NFQUEUE rule in
/// the same chain are skipped when the verdict is ACCEPT. `--queue-bypass` lets packets
/// through undelayed instead of dropping them whenever no delayer is bound to the queue.
pub fn rule_args(dev: &str, queue_num: u16) -> Vec<String> {
    [
        "-o",
        dev,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue_num.to_string(),
        "--queue-bypass",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Installs the rule of [`rule_args`] in namespace `netns` with the `iptables` command.
pub fn install_rule(netns: &str, dev: &str, queue_num: u16) -> io::Result<()> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "iptables",
            "-t",
            "mangle",
            "-A",
            "POSTROUTING",
        ])
        .args(rule_args(dev, queue_num))
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "iptables in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A packet held in the FIFO.
struct Held {
    due: Instant,
    id: u32,
}

/// The bound queue, owned by the delay thread.
struct Queue {
    fd: OwnedFd,
    num: u16,
    delay: Duration,
    seq: u32,
    held: VecDeque<Held>,
    buf: Vec<u8>,
    events: Vec<Event>,
}

impl Queue {
    /// Binds queue `num` in the calling thread's network namespace.
    fn bind(num: u16, delay: Duration) -> io::Result<Queue> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        socket::setsockopt(&fd, sockopt::RcvBufForce, &RECV_BUFFER)?;
        let mut queue = Queue {
            fd,
            num,
            delay,
            seq: 0,
            held: VecDeque::new(),
            // Metadata-only packet messages are ~100 bytes; one datagram holds one.
            buf: vec![0; 64 * 1024],
            events: Vec::new(),
        };
        // All in one message: until its copy mode is set, a new queue drops the packets
        // sent to it (queue-bypass applies only to a queue nobody is bound to).
        // The command: BIND, padding, protocol family (0: none, ignored since Linux 3.8);
        // fails with EBUSY if another socket holds the queue. Then copy range 0
        // (big-endian u32) and the metadata-only mode: a verdict needs the packet's id,
        // not its bytes.
        queue.configure(&[
            (NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]),
            (NFQA_CFG_PARAMS, &[0, 0, 0, 0, NFQNL_COPY_META]),
            (NFQA_CFG_QUEUE_MAXLEN, &QUEUE_MAX_LEN.to_be_bytes()),
        ])?;
        Ok(queue)
    }

    /// Sends a configuration message and waits for the kernel's acknowledgement; packets
    /// arriving meanwhile (a rule may already be in place) are held as usual.
    fn configure(&mut self, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = message(
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.num,
            attrs,
        );
        self.send(&msg)?;
        let deadline = Instant::now() + CONFIG_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from nfnetlink_queue",
                ));
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match ppoll(&mut fds, Some(TimeSpec::from_duration(left)), None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let mut answer = None;
            self.receive(|event| {
                if let Event::Ack { seq: s, errno } = event
                    && s == seq
                {
                    answer = Some(errno);
                }
            })?;
            match answer {
                Some(0) => return Ok(()),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }

    /// Holds and releases packets until `stop` reads as closed, then lets every packet go.
    fn run(&mut self, stop: &UnixStream, counters: &Counters) -> io::Result<()> {
        let result = self.serve(stop, counters);
        result.and(self.let_all_go(counters))
    }

    /// Closing the socket would make the kernel drop the packets it queued for us (held
    /// here or not yet read), so: release the held ones, then make the queue "fail open"
    /// with room for none, which from the kernel's acknowledgement on passes new packets
    /// straight through, then release what was queued before that. Only packets arriving
    /// in the microseconds of this handover can overtake the last ones released.
    fn let_all_go(&mut self, counters: &Counters) -> io::Result<()> {
        self.release(None, counters)?;
        // Two messages: in one, the kernel would apply the length before the flag, and a
        // packet coming in between would find a full queue that does not fail open.
        // Packets read while awaiting the answers are released after each, so that few
        // wait behind the ones passing straight through.
        let fail_open = NFQA_CFG_F_FAIL_OPEN.to_be_bytes();
        self.configure(&[(NFQA_CFG_FLAGS, &fail_open), (NFQA_CFG_MASK, &fail_open)])?;
        self.release(None, counters)?;
        self.configure(&[(NFQA_CFG_QUEUE_MAXLEN, &0u32.to_be_bytes())])?;
        self.receive(|_| {})?;
        self.release(None, counters)
    }

    fn serve(&mut self, stop: &UnixStream, counters: &Counters) -> io::Result<()> {
        loop {
            // Sleep until a packet comes, the oldest held one is due, or stop.
            let timeout = self.held.front().map(|first| {
                TimeSpec::from_duration(first.due.saturating_duration_since(Instant::now()))
            });
            let mut fds = [
                PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            match ppoll(&mut fds, timeout, None) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let stopping = fds[1].revents().is_some_and(|r| !r.is_empty());
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                self.receive(|event| match event {
                    // Config acks were all awaited in bind(); an error now answers a verdict.
                    Event::Ack { errno, .. } if errno != 0 => {
                        counters.verdict_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Ack { .. } | Event::Packet(_) => {}
                })
                .or_else(|e| {
                    // The socket overflowed and the kernel dropped packets (counted in
                    // its user_dropped too); carry on with the next ones.
                    if e.raw_os_error() == Some(Errno::ENOBUFS as i32) {
                        counters.recv_overflows.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
            }
            self.release(Some(Instant::now()), counters)?;
            if stopping {
                return Ok(());
            }
        }
    }

    /// Reads every waiting message: packets join the FIFO, due `delay` from now; the other
    /// events go to `on_event`.
    fn receive(&mut self, mut on_event: impl FnMut(Event)) -> io::Result<()> {
        loop {
            let len = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT)
            {
                Ok(len) => len,
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let due = Instant::now() + self.delay;
            self.events.clear();
            parse(&self.buf[..len], &mut self.events);
            for event in self.events.drain(..) {
                match event {
                    Event::Packet(id) => self.held.push_back(Held { due, id }),
                    other => on_event(other),
                }
            }
        }
    }

    /// Accepts held packets in order: those due by `now`, or all of them given `None`.
    fn release(&mut self, now: Option<Instant>, counters: &Counters) -> io::Result<()> {
        while let Some(first) = self.held.front() {
            if let Some(now) = now {
                if first.due > now {
                    break;
                }
                let late = now.duration_since(first.due);
                let nanos = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
                counters.max_late.fetch_max(nanos, Ordering::Relaxed);
                if late > Duration::from_millis(1) {
                    counters.late_over_1ms.fetch_add(1, Ordering::Relaxed);
                }
            }
            let mut header = [0; 8];
            header[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
            header[4..].copy_from_slice(&first.id.to_be_bytes());
            let msg = message(
                NFQNL_MSG_VERDICT,
                NLM_F_REQUEST,
                0,
                self.num,
                &[(NFQA_VERDICT_HDR, &header)],
            );
            self.send(&msg)?;
            self.held.pop_front();
            counters.delayed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // Port id 0: the kernel.
        socket::sendto(
            self.fd.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }
}

/// What a datagram from the kernel says.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A queued packet, by the id its verdict must name.
    Packet(u32),
    /// The answer to request `seq`: 0 for success, else an errno.
    Ack { seq: u32, errno: i32 },
}

/// A netfilter-queue request: netlink header, `nfgenmsg`, then the attributes (type and
/// payload), each padded to 4 bytes. Netlink headers are host-endian, the queue's fields
/// big-endian.
fn message(kind: u16, flags: u16, seq: u32, queue_num: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64);
    m.extend_from_slice(&0u32.to_ne_bytes()); // length, filled in below
    m.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // sender's port id: the kernel fills it in
    m.extend_from_slice(&[0, 0]); // AF_UNSPEC, NFNETLINK_V0
    m.extend_from_slice(&queue_num.to_be_bytes());
    for (kind, payload) in attrs {
        // Payloads here are a few bytes: no overflow of the u16 length.
        let len = (4 + payload.len()) as u16;
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(align4(m.len()), 0);
    }
    let total = m.len() as u32;
    m[..4].copy_from_slice(&total.to_ne_bytes());
    m
}

/// Splits a datagram into its netlink messages; ignores what is neither a queued packet
/// nor an acknowledgement, and stops at anything malformed.
fn parse(datagram: &[u8], events: &mut Vec<Event>) {
    let mut rest = datagram;
    while let (Some(len), Some(kind), Some(seq)) =
        (ne_u32(rest, 0), ne_u16(rest, 4), ne_u32(rest, 8))
    {
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return;
        }
        let body = &rest[NLMSG_HDRLEN..len];
        if kind == NLMSG_ERROR {
            // struct nlmsgerr: a negative errno (0 for an ACK), then the request's header.
            if let Some(error) = ne_u32(body, 0) {
                let errno = (error as i32).wrapping_neg();
                events.push(Event::Ack { seq, errno });
            }
        } else if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
            && let Some(id) = body.get(NFGENMSG_LEN..).and_then(packet_id)
        {
            events.push(Event::Packet(id));
        }
        rest = rest.get(align4(len)..).unwrap_or_default();
    }
}

/// The id in a packet message's NFQA_PACKET_HDR attribute (`struct
/// nfqnl_msg_packet_hdr`: big-endian id, protocol, hook).
fn packet_id(mut attrs: &[u8]) -> Option<u32> {
    while let (Some(len), Some(kind)) = (ne_u16(attrs, 0), ne_u16(attrs, 2)) {
        let len = usize::from(len);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR {
            let id = attrs.get(4..8)?;
            return Some(u32::from_be_bytes([id[0], id[1], id[2], id[3]]));
        }
        attrs = attrs.get(align4(len)..).unwrap_or_default();
    }
    None
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn ne_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
mod tests {
    // Built without its #[test]s in the benchmark that includes this file.
    #[allow(unused_imports)]
    use super::*;

    #[test]
    fn verdict_message_layout() {
        let m = message(
            NFQNL_MSG_VERDICT,
            NLM_F_REQUEST,
            7,
            3,
            &[(NFQA_VERDICT_HDR, &[1; 8])],
        );
        assert_eq!(m.len(), 16 + 4 + 4 + 8);
        assert_eq!(ne_u32(&m, 0), Some(32));
        assert_eq!(ne_u16(&m, 4), Some(0x0301));
        assert_eq!(ne_u32(&m, 8), Some(7));
        assert_eq!(&m[18..20], &[0, 3]); // queue number, big-endian
        assert_eq!(ne_u16(&m, 20), Some(12));
        assert_eq!(ne_u16(&m, 22), Some(NFQA_VERDICT_HDR));
    }

    #[test]
    fn params_attribute_is_padded() {
        let m = message(
            NFQNL_MSG_CONFIG,
            0,
            0,
            0,
            &[(NFQA_CFG_PARAMS, &[0, 0, 0, 0, 1]), (3, &[9; 4])],
        );
        // 9-byte attribute padded to 12, then the 8-byte one.
        assert_eq!(m.len(), 20 + 12 + 8);
        assert_eq!(ne_u16(&m, 20), Some(9));
        assert_eq!(ne_u16(&m, 32), Some(8));
    }

    #[test]
    fn parses_packets_and_acks() {
        // A packet message with a mark attribute before the packet header.
        let mut packet = message(
            NFQNL_MSG_PACKET,
            0,
            0,
            1,
            &[(3, &[0; 4]), (NFQA_PACKET_HDR, &[0, 0, 1, 2, 8, 0, 4])],
        );
        // An error answer to request 5: -EBUSY, then the request's header.
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        packet.extend_from_slice(&ack);
        packet.extend_from_slice(&[1, 2, 3]); // truncated junk is ignored
        let mut events = Vec::new();
        parse(&packet, &mut events);
        assert_eq!(
            events,
            [Event::Packet(0x102), Event::Ack { seq: 5, errno: 16 }]
        );
    }

    #[test]
    fn reads_kernel_stats() {
        let text = "    0  12345     3 1     0     0     0       90  1\n    \
                    2  12346     0 1     0     4     7      500  1\n";
        assert_eq!(parse_kernel_stats(text, 2), Some((4, 7)));
        assert_eq!(parse_kernel_stats(text, 0), Some((0, 0)));
        assert_eq!(parse_kernel_stats(text, 1), None);
    }
}
