//! Repair streams: retransmissions (RTX, RFC 4588) and forward error correction
//! (FlexFEC draft 03), counted as part of the transport.
//!
//! - [`WithRepairStreams`]: the crate's NACK responder sends repairs on the stream's RTX
//!   SSRC, but its TWCC sender and congestion controller only know the streams they were
//!   bound to, so RTX packets left without a transport-wide sequence number. The other
//!   side then has packets it cannot report in its TWCC feedback; libwebrtc (Chromium)
//!   feeds such packets to its older receive-side estimator and answers with a REMB of
//!   about 100 kbit/s, which holds the sender at the bottom of its range (measured on the
//!   `home` link: Duet's sending rate toward Chromium fell from ~600 to 100 kbit/s within
//!   a second of the first repair). The wrapper binds each local stream's RTX and FEC
//!   SSRCs as streams of their own, with the same header extensions.
//! - [`FecSender`]: FlexFEC repair packets for each video frame, as many as the measured
//!   loss calls for ([`FecPolicy`]): a lost packet is rebuilt from the repair packet
//!   right behind the frame instead of waiting a round trip for a retransmission. None
//!   while nothing is lost, or when the round trip is short enough for NACK alone.
//! - [`CountRecovered`]: counts the packets the crate's FlexFEC receiver rebuilt.
//! - [`LossReports`]: the loss the other side reports for our streams, from the report
//!   blocks of its receiver *and sender* reports (the crate's statistics read only
//!   receiver reports, and a side that sends media reports in its sender reports, so
//!   in a call the crate's `fraction_lost` stays 0).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    Attribute, AttributedPacket, FlexFec03Encoder, Interceptor, Packet, StreamInfo, TaggedPacket,
};
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::sansio::Protocol;

/// An interceptor that also sees each local stream's RTX and FEC SSRCs as streams.
pub struct WithRepairStreams<T>(pub T);

/// The RTX and FEC streams of `info`, as streams of their own.
pub fn repair_streams(info: &StreamInfo) -> Vec<StreamInfo> {
    let bare = StreamInfo {
        ssrc_rtx: None,
        payload_type_rtx: None,
        ssrc_fec: None,
        payload_type_fec: None,
        ..info.clone()
    };
    [
        (info.ssrc_rtx, info.payload_type_rtx),
        (info.ssrc_fec, info.payload_type_fec),
    ]
    .into_iter()
    .filter_map(|(ssrc, pt)| {
        Some(StreamInfo {
            ssrc: ssrc?,
            payload_type: pt.unwrap_or(info.payload_type),
            ..bare.clone()
        })
    })
    .collect()
}

/// The `Protocol` of every interceptor in the chain.
pub trait Stage:
    Protocol<
        TaggedPacket,
        TaggedPacket,
        (),
        Rout = TaggedPacket,
        Wout = TaggedPacket,
        Eout = (),
        Time = Instant,
        Error = rtc::shared::error::Error,
    >
{
}

impl<T> Stage for T where
    T: Protocol<
            TaggedPacket,
            TaggedPacket,
            (),
            Rout = TaggedPacket,
            Wout = TaggedPacket,
            Eout = (),
            Time = Instant,
            Error = rtc::shared::error::Error,
        >
{
}

/// `Protocol` for a wrapper around an interceptor in its field `$inner`: everything goes
/// to it, except what the wrapper's own `poll_read` and `poll_write` do.
macro_rules! delegate_protocol {
    ($wrapper:ident . $inner:tt, poll_read = $poll_read:expr, poll_write = $poll_write:expr) => {
        impl<T: Stage> Protocol<TaggedPacket, TaggedPacket, ()> for $wrapper<T> {
            type Rout = TaggedPacket;
            type Wout = TaggedPacket;
            type Eout = ();
            type Error = rtc::shared::error::Error;
            type Time = Instant;

            fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
                self.$inner.handle_read(msg)
            }

            fn poll_read(&mut self) -> Option<TaggedPacket> {
                let poll: fn(&mut Self) -> Option<TaggedPacket> = $poll_read;
                poll(self)
            }

            fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
                self.$inner.handle_write(msg)
            }

            fn poll_write(&mut self) -> Option<TaggedPacket> {
                let poll: fn(&mut Self) -> Option<TaggedPacket> = $poll_write;
                poll(self)
            }

            fn handle_event(&mut self, evt: ()) -> Result<(), Self::Error> {
                self.$inner.handle_event(evt)
            }

            fn poll_event(&mut self) -> Option<()> {
                self.$inner.poll_event()
            }

            fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
                self.$inner.handle_timeout(now)
            }

            fn poll_timeout(&mut self) -> Option<Instant> {
                self.$inner.poll_timeout()
            }

            fn close(&mut self) -> Result<(), Self::Error> {
                self.$inner.close()
            }
        }
    };
}

delegate_protocol!(
    WithRepairStreams.0,
    poll_read = |w| w.0.poll_read(),
    poll_write = |w| w.0.poll_write()
);

impl<T: Interceptor + Stage> Interceptor for WithRepairStreams<T> {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.0.bind_local_stream(info);
        for repair in repair_streams(info) {
            self.0.bind_local_stream(&repair);
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_local_stream(info);
        for repair in repair_streams(info) {
            self.0.unbind_local_stream(&repair);
        }
    }

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.bind_remote_stream(info);
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_remote_stream(info);
    }
}

/// Counts the packets an inner FEC receiver rebuilt (they carry
/// [`Attribute::RecoveredByFec`]) into a shared counter.
pub struct CountRecovered<T>(pub T, pub Arc<AtomicU64>);

delegate_protocol!(
    CountRecovered.0,
    poll_read = |w| {
        let msg = w.0.poll_read()?;
        if msg.message.get(&Attribute::RecoveredByFec).is_some() {
            w.1.fetch_add(1, Ordering::Relaxed);
        }
        Some(msg)
    },
    poll_write = |w| w.0.poll_write()
);

impl<T: Interceptor + Stage> Interceptor for CountRecovered<T> {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.0.bind_local_stream(info);
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_local_stream(info);
    }

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.bind_remote_stream(info);
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_remote_stream(info);
    }
}

/// The loss the other side last reported for each of our streams (RTCP report blocks,
/// in SR and RR alike), shared with whoever reads it.
#[derive(Debug, Clone, Default)]
pub struct ReportedLoss(Arc<std::sync::Mutex<HashMap<u32, f64>>>);

impl ReportedLoss {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, f64>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The worst fraction lost over our streams (None before the first report).
    pub fn worst(&self) -> Option<f64> {
        let map = self.lock();
        map.values().copied().reduce(f64::max)
    }

    fn record(&self, ssrc: u32, fraction_lost: u8) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&ssrc) {
            *entry = f64::from(fraction_lost) / 256.0;
        }
    }

    fn bind(&self, ssrc: u32) {
        let mut map = self.lock();
        map.entry(ssrc).or_insert(0.0);
    }

    fn unbind(&self, ssrc: u32) {
        let mut map = self.lock();
        map.remove(&ssrc);
    }
}

/// Reads the report blocks about our streams out of incoming RTCP into [`ReportedLoss`];
/// everything passes on unchanged.
pub struct LossReports {
    loss: ReportedLoss,
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

impl LossReports {
    pub fn new(loss: ReportedLoss) -> LossReports {
        LossReports {
            loss,
            read: Default::default(),
            write: Default::default(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for LossReports {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            for p in packets {
                let any = p.as_any();
                let blocks = if let Some(sr) = any.downcast_ref::<SenderReport>() {
                    &sr.reports
                } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                    &rr.reports
                } else {
                    continue;
                };
                for block in blocks {
                    self.loss.record(block.ssrc, block.fraction_lost);
                }
            }
        }
        self.read.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for LossReports {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.loss.bind(info.ssrc);
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.loss.unbind(info.ssrc);
    }

    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// How much FEC to send: the share of repair packets per media packet, in thousandths
/// (shared between the session, which measures, and [`FecSender`], which sends).
#[derive(Debug, Clone, Default)]
pub struct FecLevel(Arc<AtomicU32>);

impl FecLevel {
    pub fn set(&self, overhead: f64) {
        let permille = (overhead.clamp(0.0, 1.0) * 1000.0).round() as u32;
        self.0.store(permille, Ordering::Relaxed);
    }

    pub fn get(&self) -> f64 {
        f64::from(self.0.load(Ordering::Relaxed)) / 1000.0
    }
}

/// Decides the FEC share from the loss the other side reports and the round trip.
///
/// - Nothing while loss stays under [`FecPolicy::MIN_LOSS`]: FEC costs bandwidth, and a
///   rare loss is repaired by one retransmission.
/// - Nothing when the path's round trip (the least over the last
///   [`FecPolicy::RTT_WINDOW`]) is under [`FecPolicy::MIN_RTT`]: a retransmission comes
///   back before the frame is due anyway. A round trip swollen by a queue does not
///   count: that loss is congestion, and FEC would only add to it.
/// - Otherwise five times the loss, between 10 % and 50 %: one repair packet for a
///   typical 8-10 packet frame at 1-2 % loss, two at 5 %.
///
/// The loss is remembered at its peak and forgotten slowly (half-life ~7 s): loss comes
/// in bursts, and a report that says 0 right after a loss is not a healed link.
#[derive(Debug, Default)]
pub struct FecPolicy {
    loss: f64,
    at: Option<Instant>,
    rtts: std::collections::VecDeque<(Instant, Duration)>,
}

impl FecPolicy {
    pub const MIN_LOSS: f64 = 0.005;
    pub const MIN_RTT: Duration = Duration::from_millis(30);
    const HALF_LIFE: Duration = Duration::from_secs(7);
    pub const RTT_WINDOW: Duration = Duration::from_secs(30);

    /// A new loss report (fraction) and round trip (None: not measured yet) at `now`;
    /// returns the FEC share.
    pub fn update(&mut self, now: Instant, loss: f64, rtt: Option<Duration>) -> f64 {
        let elapsed = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.at = Some(now);
        let decay = 0.5f64.powf(elapsed.as_secs_f64() / Self::HALF_LIFE.as_secs_f64());
        let loss = if loss.is_finite() {
            loss.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.loss = (self.loss * decay).max(loss);
        if let Some(rtt) = rtt {
            self.rtts.push_back((now, rtt));
        }
        while self
            .rtts
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) > Self::RTT_WINDOW)
        {
            self.rtts.pop_front();
        }
        let path_rtt = self
            .rtts
            .iter()
            .map(|&(_, r)| r)
            .min()
            .unwrap_or(Duration::ZERO);
        if self.loss < Self::MIN_LOSS || path_rtt < Self::MIN_RTT {
            return 0.0;
        }
        (self.loss * 5.0).clamp(0.1, 0.5)
    }
}

/// The repair packets for a block of `media` packets at FEC share `overhead` (at least
/// one while FEC is on).
pub fn repair_count(media: usize, overhead: f64) -> u32 {
    if overhead <= 0.0 || media == 0 {
        return 0;
    }
    let n = (media as f64 * overhead).ceil() as u32;
    n.clamp(1, media as u32)
}

/// The most media packets one block protects: a large keyframe is protected in pieces,
/// so repair packets do not wait for the whole frame.
const MAX_BLOCK: usize = 24;

struct Protected {
    encoder: FlexFec03Encoder,
    block: Vec<rtc::rtp::Packet>,
}

/// Sends FlexFEC (draft 03) repair packets for video: after each frame (the marker bit)
/// or every [`MAX_BLOCK`] packets, [`repair_count`] repair packets at the current
/// [`FecLevel`]. The crate's sender protects fixed blocks of packets, which leaves the
/// end of a frame waiting for the next frame's packets, and sends the same share
/// whatever the loss.
///
/// It wraps the TWCC sender (`inner`) and protects packets as they leave it: FEC covers
/// the header extensions too, so it must see the packets exactly as they go on the wire
/// (protected before the transport-wide sequence number was added, nothing could be
/// rebuilt). Repair packets go back through `inner` for a sequence number of their own,
/// so congestion control counts them. They are not paced: they follow their frame's
/// paced packets, a tenth to a half as many.
pub struct FecSender<T> {
    inner: T,
    level: FecLevel,
    streams: HashMap<u32, Protected>,
    sent: Arc<AtomicU64>,
}

impl<T> FecSender<T> {
    pub fn new(inner: T, level: FecLevel, sent: Arc<AtomicU64>) -> FecSender<T> {
        FecSender {
            inner,
            level,
            streams: HashMap::new(),
            sent,
        }
    }
}

impl<T: Stage> FecSender<T> {
    /// Takes note of a packet on its way out; at the end of a block, hands the repair
    /// packets to `inner` (they come out of it next).
    fn protect(&mut self, msg: &TaggedPacket) {
        let overhead = self.level.get();
        let Packet::Rtp(rtp) = &msg.message.packet else {
            return;
        };
        let Some(stream) = self.streams.get_mut(&rtp.header.ssrc) else {
            return;
        };
        if overhead <= 0.0 {
            stream.block.clear();
            return;
        }
        // A block is a run of consecutive packets (the encoder refuses a gap).
        if stream.block.last().is_some_and(|last| {
            last.header.sequence_number.wrapping_add(1) != rtp.header.sequence_number
        }) {
            stream.block.clear();
        }
        stream.block.push(rtp.clone());
        if !rtp.header.marker && stream.block.len() < MAX_BLOCK {
            return;
        }
        let count = repair_count(stream.block.len(), overhead);
        let repairs = stream.encoder.encode(&stream.block, count);
        stream.block.clear();
        self.sent.fetch_add(repairs.len() as u64, Ordering::Relaxed);
        for packet in repairs {
            let repair = TaggedPacket {
                now: msg.now,
                transport: msg.transport,
                message: AttributedPacket::new(Packet::Rtp(packet)),
            };
            if let Err(e) = self.inner.handle_write(repair) {
                tracing::debug!(error = %e, "FEC packet");
            }
        }
    }
}

delegate_protocol!(
    FecSender.inner,
    poll_read = |w| w.inner.poll_read(),
    poll_write = |w| {
        let msg = w.inner.poll_write()?;
        w.protect(&msg);
        Some(msg)
    }
);

impl<T: Interceptor + Stage> Interceptor for FecSender<T> {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.inner.bind_local_stream(info);
        if let (Some(ssrc), Some(pt)) = (info.ssrc_fec, info.payload_type_fec) {
            self.streams.insert(
                info.ssrc,
                Protected {
                    encoder: FlexFec03Encoder::new(pt, ssrc),
                    block: Vec::new(),
                },
            );
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.inner.unbind_local_stream(info);
        self.streams.remove(&info.ssrc);
    }

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.bind_remote_stream(info);
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.inner.unbind_remote_stream(info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::{FlexFec03ReceiveBuilder, RTPHeaderExtension, TwccSenderBuilder};
    use rtc::rtp;

    fn rtp(ssrc: u32, seq: u16) -> TaggedPacket {
        TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: AttributedPacket::new(Packet::Rtp(rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    ssrc,
                    sequence_number: seq,
                    ..Default::default()
                },
                payload: vec![0u8; 100].into(),
            })),
        }
    }

    fn transport_seq(p: &TaggedPacket) -> Option<u16> {
        let Packet::Rtp(rtp) = &p.message.packet else {
            return None;
        };
        let ext = rtp.header.get_extension(5)?;
        Some(u16::from_be_bytes([*ext.first()?, *ext.get(1)?]))
    }

    #[test]
    fn rtx_packets_get_transport_wide_sequence_numbers_in_the_same_space() {
        let info = StreamInfo {
            ssrc: 1000,
            ssrc_rtx: Some(2000),
            payload_type: 102,
            payload_type_rtx: Some(103),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
                id: 5,
            }],
            ..Default::default()
        };
        let mut plain = TwccSenderBuilder::new().build();
        plain.bind_local_stream(&info);
        let mut wrapped = WithRepairStreams(TwccSenderBuilder::new().build());
        wrapped.bind_local_stream(&info);

        let mut seqs = Vec::new();
        for (ssrc, seq) in [(1000, 1), (2000, 0), (1000, 2)] {
            plain.handle_write(rtp(ssrc, seq)).unwrap();
            wrapped.handle_write(rtp(ssrc, seq)).unwrap();
            let (Some(p), Some(w)) = (plain.poll_write(), wrapped.poll_write()) else {
                panic!("every packet passes");
            };
            seqs.push((transport_seq(&p), transport_seq(&w)));
        }
        assert_eq!(seqs[1].0, None, "the crate alone leaves RTX untagged");
        let wrapped: Vec<_> = seqs.iter().map(|s| s.1).collect();
        assert_eq!(wrapped, [Some(0), Some(1), Some(2)], "one sequence space");

        // Unbinding the stream unbinds its RTX too.
        let mut w = WithRepairStreams(TwccSenderBuilder::new().build());
        w.bind_local_stream(&info);
        w.unbind_local_stream(&info);
        w.handle_write(rtp(2000, 1)).unwrap();
        assert_eq!(w.poll_write().as_ref().and_then(transport_seq), None);
    }

    fn video_packet(seq: u16, marker: bool, fill: u8) -> TaggedPacket {
        let mut p = rtp(1000, seq);
        if let Packet::Rtp(r) = &mut p.message.packet {
            r.header.marker = marker;
            r.header.payload_type = 102;
            r.header.timestamp = 9000;
            r.payload = vec![fill; 300 + usize::from(fill)].into();
        }
        p
    }

    fn protected() -> StreamInfo {
        StreamInfo {
            ssrc: 1000,
            payload_type: 102,
            ssrc_fec: Some(3000),
            payload_type_fec: Some(118),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
                id: 5,
            }],
            ..Default::default()
        }
    }

    /// Sends one frame of `n` packets through a [`FecSender`] around the TWCC sender at
    /// `overhead`; returns what left, in order.
    fn send_frame(overhead: f64, n: u16) -> (Vec<TaggedPacket>, u64) {
        let level = FecLevel::default();
        level.set(overhead);
        let sent = Arc::new(AtomicU64::new(0));
        let twcc = WithRepairStreams(TwccSenderBuilder::new().build());
        let mut sender = FecSender::new(twcc, level, sent.clone());
        sender.bind_local_stream(&protected());
        let mut out = Vec::new();
        for i in 0..n {
            sender
                .handle_write(video_packet(100 + i, i + 1 == n, i as u8))
                .unwrap();
            while let Some(p) = sender.poll_write() {
                out.push(p);
            }
        }
        (out, sent.load(Ordering::Relaxed))
    }

    fn copy(p: &TaggedPacket) -> TaggedPacket {
        let Packet::Rtp(r) = &p.message.packet else {
            panic!("RTP");
        };
        TaggedPacket {
            now: p.now,
            transport: Default::default(),
            message: AttributedPacket::new(Packet::Rtp(r.clone())),
        }
    }

    fn ssrc_of(p: &TaggedPacket) -> u32 {
        match &p.message.packet {
            Packet::Rtp(r) => r.header.ssrc,
            _ => 0,
        }
    }

    #[test]
    fn a_lost_packet_is_rebuilt_from_the_repair_packet_behind_its_frame() {
        let (out, sent) = send_frame(0.1, 8);
        assert_eq!(sent, 1, "one repair packet for an 8-packet frame at 10 %");
        assert_eq!(out.len(), 9);
        assert_eq!(
            ssrc_of(&out[8]),
            3000,
            "the repair follows the frame's last packet"
        );

        let recovered = Arc::new(AtomicU64::new(0));
        let mut receiver =
            CountRecovered(FlexFec03ReceiveBuilder::new().build(), recovered.clone());
        receiver.bind_remote_stream(&protected());
        let lost = 3;
        let mut arrived = Vec::new();
        for (i, p) in out.iter().enumerate() {
            if i != lost {
                receiver.handle_read(copy(p)).unwrap();
            }
            while let Some(p) = receiver.poll_read() {
                arrived.push(p);
            }
        }
        assert_eq!(recovered.load(Ordering::Relaxed), 1);
        let rebuilt = arrived
            .iter()
            .find(|p| p.message.get(&Attribute::RecoveredByFec).is_some())
            .expect("a rebuilt packet");
        let (Packet::Rtp(rebuilt), Packet::Rtp(original)) =
            (&rebuilt.message.packet, &out[lost].message.packet)
        else {
            panic!("RTP");
        };
        assert_eq!(
            rebuilt.header.sequence_number,
            original.header.sequence_number
        );
        assert_eq!(rebuilt.payload, original.payload);
        assert!(
            arrived.iter().all(|p| ssrc_of(p) == 1000),
            "repair packets are swallowed"
        );
    }

    #[test]
    fn no_fec_is_sent_while_the_level_is_zero_and_keyframes_are_protected_in_blocks() {
        let (out, sent) = send_frame(0.0, 8);
        assert_eq!((out.len(), sent), (8, 0));
        // A 50-packet keyframe at 10 %: blocks of 24, 24 and 2, each with its repairs
        // right behind it.
        let (out, sent) = send_frame(0.1, 50);
        assert_eq!(sent, 3 + 3 + 1);
        let repair_at: Vec<usize> = (0..out.len())
            .filter(|&i| ssrc_of(&out[i]) == 3000)
            .collect();
        assert_eq!(repair_at, [24, 25, 26, 51, 52, 53, 56]);
    }

    #[test]
    fn repair_count_rounds_up_and_stays_within_the_block() {
        assert_eq!(repair_count(8, 0.0), 0);
        assert_eq!(repair_count(8, 0.1), 1);
        assert_eq!(repair_count(8, 0.25), 2);
        assert_eq!(repair_count(40, 0.1), 4);
        assert_eq!(repair_count(1, 0.5), 1);
        assert_eq!(repair_count(3, 1.0), 3);
        assert_eq!(repair_count(0, 0.5), 0);
    }

    #[test]
    fn the_policy_follows_loss_remembers_bursts_and_leaves_short_round_trips_to_nack() {
        let t0 = Instant::now();
        let rtt = Some(Duration::from_millis(80));
        let mut p = FecPolicy::default();
        assert_eq!(p.update(t0, 0.0, rtt), 0.0, "a clean link: no FEC");
        assert_eq!(p.update(t0, 0.002, rtt), 0.0, "a rare loss: NACK is enough");
        assert_eq!(p.update(t0, 0.02, rtt), 0.1);
        let five = p.update(t0, 0.05, rtt);
        assert!((five - 0.25).abs() < 1e-9, "{five}");
        assert_eq!(p.update(t0, 0.5, rtt), 0.5, "at most half");
        // A report of no loss right after: the burst is remembered, then forgotten.
        let mut p = FecPolicy::default();
        p.update(t0, 0.04, rtt);
        let soon = p.update(t0 + Duration::from_secs(1), 0.0, rtt);
        assert!(soon > 0.15, "{soon}");
        let later = p.update(t0 + Duration::from_secs(40), 0.0, rtt);
        assert_eq!(later, 0.0);
        // A short round trip: retransmissions come in time, also when a queue swells
        // it for a while (that loss is congestion).
        let mut p = FecPolicy::default();
        assert_eq!(p.update(t0, 0.05, Some(Duration::from_millis(5))), 0.0);
        let queued = t0 + Duration::from_secs(2);
        assert_eq!(
            p.update(queued, 0.05, Some(Duration::from_millis(250))),
            0.0
        );
        let moved = t0 + Duration::from_secs(40);
        assert!(
            p.update(moved, 0.05, Some(Duration::from_millis(90))) > 0.0,
            "a new path"
        );
        let mut p = FecPolicy::default();
        assert_eq!(p.update(t0, f64::NAN, rtt), 0.0, "a bad report is no loss");
        // Before the round trip is known: none, and the unknown is not taken as short.
        let mut p = FecPolicy::default();
        assert_eq!(p.update(t0, 0.05, None), 0.0);
        assert!(p.update(t0, 0.05, rtt) > 0.0);
    }

    #[test]
    fn loss_is_read_from_sender_reports_as_well_as_receiver_reports() {
        use rtc::rtcp::reception_report::ReceptionReport;
        let loss = ReportedLoss::default();
        let mut reports = LossReports::new(loss.clone());
        reports.bind_local_stream(&StreamInfo {
            ssrc: 1000,
            ..Default::default()
        });
        assert_eq!(loss.worst(), Some(0.0));
        let block = |ssrc, fraction_lost| ReceptionReport {
            ssrc,
            fraction_lost,
            ..Default::default()
        };
        let rtcp = |p: Box<dyn rtc::rtcp::Packet>| TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: AttributedPacket::new(Packet::Rtcp(vec![p])),
        };
        // A block about someone else's stream is not ours.
        let sr = SenderReport {
            reports: vec![block(1000, 13), block(7, 200)],
            ..Default::default()
        };
        reports.handle_read(rtcp(Box::new(sr))).unwrap();
        assert!(reports.poll_read().is_some(), "RTCP passes on");
        assert_eq!(loss.worst(), Some(13.0 / 256.0));
        let rr = ReceiverReport {
            reports: vec![block(1000, 0)],
            ..Default::default()
        };
        reports.handle_read(rtcp(Box::new(rr))).unwrap();
        assert_eq!(loss.worst(), Some(0.0));
    }
}
