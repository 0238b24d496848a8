//! The WebRTC peer connection (webrtc-rs 0.21) set up for a Duet call: H.264 (with RTX
//! and FlexFEC) + Opus tracks, the `chat` data channel, trickle ICE with queued remote
//! candidates, TURN over TCP/TLS through local bridges ([`super::turn_bridge`]), the interceptor chain (NACK, RTCP reports, GCC congestion control with
//! TWCC, FEC, our pacer, and PLI/FIR delivered to the sender so it can answer with a
//! keyframe), and the connection's statistics.
//!
//! Why 0.21: it is the maintained line (the callback API of <= 0.14 is frozen), its
//! sans-I/O core has explicit ICE timing knobs (the check interval decides set-up time on
//! loopback), and interceptors can hand RTCP to the application.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    Attribute, CongestionControlBuilder, FlexFec03ReceiveBuilder, Interceptor,
    NackResponderBuilder, Packet, StreamInfo, TaggedPacket, TwccReceiverBuilder, TwccSenderBuilder,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    Slot, configure_rtcp_reports, configure_simulcast_extension_headers,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_FLEX_FEC03, MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8,
};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
    TYPE_RTCP_FB_TRANSPORT_CC,
};
use rtc::rtp_transceiver::{PayloadType, SSRC};
use rtc::sansio::Protocol;
use tokio::sync::mpsc;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceConnectionState, RTCIceGatheringState,
    RTCIceServer, RTCIceTransportPolicy, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription, Registry, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

use super::pacer::{MediaPacer, PacerHandle};
use super::repair::{
    CountRecovered, FecLevel, FecSender, LossReports, ReportedLoss, WithRepairStreams,
};
use super::runtime::PromptRuntime;
use super::state::Role;
use super::turn_bridge::{BridgedRelays, TurnBridge, bridge_ice_servers, deprioritize};
use crate::media::codec::VideoCodec;
use crate::signaling::protocol::{IceCandidate, IceServer};

/// The peer connection could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[error("peer connection: {0}")]
pub struct PeerError(pub String);

fn err(e: impl std::fmt::Display) -> PeerError {
    PeerError(e.to_string())
}

/// What the peer connection reports, forwarded from webrtc-rs callbacks.
pub enum PeerEvent {
    /// A local candidate to send (`None`: gathering complete).
    LocalCandidate(Option<IceCandidate>),
    State(RTCPeerConnectionState),
    /// ICE found a path (connected or completed); the DTLS handshake runs next.
    PathFound,
    Track(Arc<dyn TrackRemote>),
    DataChannel(Arc<dyn DataChannel>),
}

impl std::fmt::Debug for PeerEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerEvent::LocalCandidate(c) => write!(f, "LocalCandidate({c:?})"),
            PeerEvent::State(s) => write!(f, "State({s})"),
            PeerEvent::PathFound => write!(f, "PathFound"),
            PeerEvent::Track(_) => write!(f, "Track"),
            PeerEvent::DataChannel(_) => write!(f, "DataChannel"),
        }
    }
}

/// Where every peer connection's events arrive, tagged with the connection's number: a
/// replaced connection's late events (its `closed`) must not reach the call.
pub type PeerEvents = mpsc::UnboundedSender<(u64, PeerEvent)>;

/// How to set up the connection.
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    pub ice_servers: Vec<IceServer>,
    /// Use TURN relays only.
    pub relay_only: bool,
    /// Also gather a loopback candidate (tests and calls within one machine).
    pub loopback: bool,
}

/// Callbacks run on webrtc-rs's driver task: forward, never block.
struct Handler {
    events: PeerEvents,
    /// Which connection this is (see [`PeerEvents`]).
    number: u64,
    /// Relays reached over TCP/TLS bridges: signaled with a lower priority.
    bridged: BridgedRelays,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let candidate = IceCandidate {
                candidate: deprioritize(&init.candidate, &self.bridged),
                // webrtc-rs reports mid ""; with BUNDLE every candidate belongs to mid "0".
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
                username_fragment: init.username_fragment,
            };
            let _ = self
                .events
                .send((self.number, PeerEvent::LocalCandidate(Some(candidate))));
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self
                .events
                .send((self.number, PeerEvent::LocalCandidate(None)));
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        if matches!(
            state,
            RTCIceConnectionState::Connected | RTCIceConnectionState::Completed
        ) {
            let _ = self.events.send((self.number, PeerEvent::PathFound));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.events.send((self.number, PeerEvent::State(state)));
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.events.send((self.number, PeerEvent::Track(track)));
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let _ = self
            .events
            .send((self.number, PeerEvent::DataChannel(channel)));
    }
}

/// Hands PLI/FIR to the application (they are consumed by the interceptor chain
/// otherwise), so the video sender can answer with a keyframe.
#[derive(Default)]
struct KeyframeRequests {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

/// Whether an RTCP packet asks for a keyframe.
pub fn is_keyframe_request(p: &dyn rtc::rtcp::Packet) -> bool {
    let any = p.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequests {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        // Everything passes on unchanged; a compound packet that asks for a keyframe is
        // also marked for delivery to the application (the video sender).
        if let Packet::Rtcp(packets) = &msg.message.packet
            && packets.iter().any(|p| is_keyframe_request(p.as_ref()))
        {
            tracing::debug!("keyframe request received");
            msg.message.add(Attribute::DeliverToApplication);
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

impl Interceptor for KeyframeRequests {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// Where the congestion controller starts, and the range it stays in (bits per second,
/// all media together).
/// 800 kbit/s: a usable picture at once, and not already more than a 1 Mbit/s uplink
/// carries (the estimator sees a queue while it grows, and one filled at the start
/// costs seconds of delay and loss).
pub const INITIAL_BITRATE_BPS: u32 = 800_000;
pub const MIN_BITRATE_BPS: u32 = 100_000;
pub const MAX_BITRATE_BPS: u32 = 4_000_000;

const H264_PT: u8 = 102;
const H264_RTX_PT: u8 = 103;
const VP8_PT: u8 = 96;
const VP8_RTX_PT: u8 = 97;
const FLEXFEC_PT: u8 = 118;
const OPUS_PT: u8 = 111;

fn video_feedback() -> Vec<RTCPFeedback> {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    };
    vec![fb("nack", ""), fb("nack", "pli"), fb("ccm", "fir")]
}

fn h264_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_H264.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f"
            .to_owned(),
        rtcp_feedback: video_feedback(),
    }
}

/// VP8, WebRTC's other mandatory video codec: what Firefox sends when it has no H.264.
fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: video_feedback(),
    }
}

fn video_codec(codec: VideoCodec) -> RTCRtpCodec {
    match codec {
        VideoCodec::H264 => h264_codec(),
        VideoCodec::Vp8 => vp8_codec(),
    }
}

/// Retransmissions of video packets on their own SSRC (RFC 4588), one RTX format per
/// video codec (`apt`). With it negotiated the NACK responder sends repairs as RTX, and
/// the endpoint unwraps the other side's RTX packets back into the video stream:
/// libwebrtc (Chromium) retransmits only this way.
fn rtx_codec(apt: u8) -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_RTX.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: format!("apt={apt}"),
        rtcp_feedback: Vec::new(),
    }
}

/// The video codecs in our order of preference, with their payload types: H.264 first
/// (hardware decoders everywhere, Safari), VP8 for peers without H.264.
fn video_codecs() -> Vec<RTCRtpCodecParameters> {
    vec![
        RTCRtpCodecParameters {
            rtp_codec: h264_codec(),
            payload_type: H264_PT,
        },
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PT,
        },
    ]
}

/// The video codec to send to a peer, from its offer or answer: H.264 when its first
/// video section lists it, else VP8 when that does; None when neither (no video).
pub fn choose_video_codec(remote_sdp: &str) -> Option<VideoCodec> {
    let mut in_video = false;
    let (mut port_zero, mut bundle_only) = (false, false);
    let mut offered = Vec::new();
    for line in remote_sdp.lines() {
        let line = line.trim_end();
        if let Some(media) = line.strip_prefix("m=") {
            if in_video {
                break; // only the first video section carries our track
            }
            let mut fields = media.split_whitespace();
            in_video = fields.next() == Some("video");
            port_zero = fields.next() == Some("0");
            continue;
        }
        if !in_video {
            continue;
        }
        bundle_only |= line == "a=bundle-only";
        // a=rtpmap:<pt> <name>/<clock>[/<channels>]
        if let Some(map) = line.strip_prefix("a=rtpmap:")
            && let Some(name) = map.split_whitespace().nth(1)
            && let Some(codec) = VideoCodec::from_mime(name.split('/').next().unwrap_or(name))
        {
            offered.push(codec);
        }
    }
    // Port 0 is a rejected section, unless it is bundled with the first one (Firefox
    // offers every section after the first so: `a=bundle-only`).
    if port_zero && !bundle_only {
        return None;
    }
    [VideoCodec::H264, VideoCodec::Vp8]
        .into_iter()
        .find(|c| offered.contains(c))
}

/// FlexFEC (draft 03) repair packets for the video ([`FecSender`] sends them as the
/// measured loss calls for; the crate's receiver rebuilds lost packets from them).
/// Browsers do not offer it by default; between Duets it repairs a loss without waiting
/// a round trip.
fn flexfec_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_FLEX_FEC03.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: "repair-window=10000000".to_owned(),
        rtcp_feedback: Vec::new(),
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: Vec::new(),
    }
}

/// The interceptor chain of a call (the crate's `register_default_interceptors` and
/// `configure_congestion_control`, composed here because three of their pieces are
/// chosen differently, and a registry warns about every replaced piece):
/// - the NACK responder (retransmits what the other side asks for); our NACKs come from
///   the video receiver's [`FrameAssembler`](crate::media::assembler::FrameAssembler),
///   which knows the round trip and which frames are already given up (the crate's
///   generator asks for every gap every interval without limit: after an outage, a
///   retransmission storm);
/// - sender and receiver reports; the SDES header extensions;
/// - send-side congestion control: GCC fed by TWCC, starting near 1 Mbit/s (its default,
///   300 kbit/s, takes tens of seconds to climb to a usable picture), and TWCC feedback
///   for the other side's controller; RTX and FEC packets are counted too
///   ([`WithRepairStreams`]);
/// - [`FecSender`] around the TWCC sender: FlexFEC for each video frame as the reported
///   loss calls for; the crate's FlexFEC receiver rebuilds lost packets from the other
///   side's ([`CountRecovered`] counts them);
/// - [`MediaPacer`] instead of the crate's pacer: audio first, video at 2.5x the estimate;
/// - [`KeyframeRequests`], handing PLI/FIR to the video sender;
/// - [`LossReports`]: the loss the other side reports, from its SR and RR report blocks.
fn interceptors(media: &mut MediaEngine) -> Result<(Registry, ChainHandles), PeerError> {
    configure_simulcast_extension_headers(media).map_err(err)?;
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        media.register_feedback(
            RTCPFeedback {
                typ: TYPE_RTCP_FB_TRANSPORT_CC.to_owned(),
                parameter: String::new(),
            },
            kind,
        );
        media
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
                },
                kind,
                None,
            )
            .map_err(err)?;
    }
    let gcc = super::estimator::Estimator::new(
        f64::from(INITIAL_BITRATE_BPS),
        f64::from(MIN_BITRATE_BPS),
        f64::from(MAX_BITRATE_BPS),
    );
    let pacer = MediaPacer::new(f64::from(INITIAL_BITRATE_BPS));
    let handles = ChainHandles {
        pacer: pacer.handle(),
        fec: FecLevel::default(),
        fec_sent: Arc::default(),
        fec_recovered: Arc::default(),
        loss: ReportedLoss::default(),
    };
    let registry = configure_rtcp_reports(Registry::new())
        .with(Slot::NackResponder, NackResponderBuilder::new().build())
        .with(
            Slot::CongestionControl,
            WithRepairStreams(CongestionControlBuilder::new(gcc).build()),
        )
        .with(
            Slot::TwccSender,
            FecSender::new(
                WithRepairStreams(TwccSenderBuilder::new().build()),
                handles.fec.clone(),
                handles.fec_sent.clone(),
            ),
        )
        .with(Slot::TwccReceiver, TwccReceiverBuilder::new().build())
        .with(Slot::Pacer, pacer)
        // Application-ward of the receiver reports and TWCC feedback, so they count only
        // what came over the wire: the loss they report is what FEC has to cover.
        .with(
            Slot::from(10_500),
            CountRecovered(
                FlexFec03ReceiveBuilder::new().build(),
                handles.fec_recovered.clone(),
            ),
        )
        .with(Slot::from(14_000), KeyframeRequests::default())
        .with(Slot::from(14_500), LossReports::new(handles.loss.clone()));
    Ok((registry, handles))
}

/// What the session reaches into the interceptor chain with.
struct ChainHandles {
    /// The sending target (the estimate capped by what is really sent).
    pacer: PacerHandle,
    /// How much FEC to send.
    fec: FecLevel,
    /// FEC packets sent; lost packets rebuilt from the other side's FEC.
    fec_sent: Arc<AtomicU64>,
    fec_recovered: Arc<AtomicU64>,
    /// What the other side reports losing of ours.
    loss: ReportedLoss,
}

/// A local track plus what is needed to write to it.
#[derive(Clone)]
pub struct LocalTrack {
    pub track: Arc<TrackLocalStaticSample>,
    pub sender: Arc<dyn RtpSender>,
    pub ssrc: SSRC,
    mime: &'static str,
    /// Video: the codec chosen from the other side's description (H.264 until then).
    /// The track's own packetizer is H.264's; VP8 is packetized by the pipeline.
    video_codec: Option<Arc<std::sync::Mutex<VideoCodec>>>,
}

impl LocalTrack {
    /// The payload type the other side accepted (known once negotiated).
    pub async fn payload_type(&self) -> Option<PayloadType> {
        let mime = match self.video_codec() {
            Some(VideoCodec::H264) | None => self.mime,
            Some(VideoCodec::Vp8) => MIME_TYPE_VP8,
        };
        let params = self.sender.get_parameters().await.ok()?;
        params
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
            .map(|c| c.payload_type)
    }

    /// The video codec this track sends (None for audio).
    pub fn video_codec(&self) -> Option<VideoCodec> {
        self.video_codec
            .as_ref()
            .map(|c| *c.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// One side of a call.
pub struct Peer {
    pc: Arc<dyn PeerConnection>,
    pub role: Role,
    pub video: LocalTrack,
    pub audio: LocalTrack,
    /// The offerer creates `chat`; the answerer receives it as a [`PeerEvent`].
    pub chat: Option<Arc<dyn DataChannel>>,
    chain: ChainHandles,
    remote_description_set: bool,
    pending_candidates: Vec<RTCIceCandidateInit>,
    /// Every remote candidate the other side signaled (address, port, type), so a
    /// peer-reflexive end learned from the checks before its candidate arrived can be
    /// named by its real type once it has.
    signaled: Vec<CandidateEnd>,
    /// Local bridges to TURN servers reached over TCP or TLS; they end with the peer.
    bridges: Vec<TurnBridge>,
    /// Our tracks' ids are made from it.
    tag: String,
    /// The video codec was chosen (from the first remote description; it stays).
    video_codec_chosen: bool,
}

/// At most this many remote candidates are queued (before the remote description) or
/// remembered: a real peer sends a
/// handful; a hostile one must not grow the app.
const MAX_REMOTE_CANDIDATES: usize = 64;

fn ice_servers(list: &[IceServer]) -> Vec<RTCIceServer> {
    list.iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect()
}

impl Peer {
    /// Builds the connection with both tracks (and, for the offerer, the data channel).
    /// Its events arrive on `events` tagged with `number`.
    pub async fn new(
        role: Role,
        config: &PeerConfig,
        number: u64,
        events: PeerEvents,
    ) -> Result<Peer, PeerError> {
        let mut media = MediaEngine::default();
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: h264_codec(),
                    payload_type: H264_PT,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: rtx_codec(H264_PT),
                    payload_type: H264_RTX_PT,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8_codec(),
                    payload_type: VP8_PT,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: rtx_codec(VP8_PT),
                    payload_type: VP8_RTX_PT,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: flexfec_codec(),
                    payload_type: FLEXFEC_PT,
                },
                RtpCodecKind::Video,
            )
            .map_err(err)?;
        media
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus_codec(),
                    payload_type: OPUS_PT,
                },
                RtpCodecKind::Audio,
            )
            .map_err(err)?;
        let (registry, chain) = interceptors(&mut media)?;

        // TURN over TCP/TLS: webrtc-rs is given local UDP bridges to those servers.
        let (servers, bridges) = bridge_ice_servers(&config.ice_servers).await;
        let configuration = RTCConfigurationBuilder::new()
            .with_ice_servers(ice_servers(&servers))
            .with_ice_transport_policy(if config.relay_only {
                RTCIceTransportPolicy::Relay
            } else {
                RTCIceTransportPolicy::All
            })
            .build();
        // The ICE agent checks every 200 ms by default, which is what set-up time on a
        // LAN is made of; 20 ms checks and no acceptance waits connect in tens of ms. A
        // pair is given up after its 7th unanswered check by default: 140 ms at this pace,
        // less than one round trip on a long link. 60 checks: about 1.2 s.
        let settings = SettingEngineBuilder::new()
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(60))
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            .with_srflx_acceptance_min_wait(Some(Duration::from_millis(100)))
            .with_prflx_acceptance_min_wait(Some(Duration::from_millis(100)))
            // Relay pairs wait 300 ms for a direct one to win; relay-only, nothing can.
            .with_relay_acceptance_min_wait(Some(if config.relay_only {
                Duration::ZERO
            } else {
                Duration::from_millis(300)
            }))
            // A path that goes quiet is `disconnected` after 2.5 s (the crate's 5 s plus a
            // 2 s keepalive meant 7 s of frozen video before an ICE restart could even
            // start), `failed` after 15 s. Keepalives (STUN binding requests on the
            // selected pair) five times a second keep that honest when no media flows, and
            // measure the round trip the queue guard watches (a 100-byte check each way,
            // ~4 kbit/s).
            .with_ice_timeouts(
                Some(Duration::from_millis(2500)),
                Some(Duration::from_secs(15)),
                Some(Duration::from_millis(200)),
            )
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            // An ICE restart closes the UDP sockets, lists the interfaces again and binds
            // new ones (and a new TURN allocation): after a laptop changes networks its
            // old address is gone, and a restart that kept the old sockets never recovers.
            .with_discard_local_candidates_during_ice_restart(true)
            .build();
        let mut addrs = vec!["0.0.0.0:0".to_owned()];
        if config.loopback {
            addrs.push("127.0.0.1:0".to_owned());
        }
        let mut builder = PeerConnectionBuilder::new();
        if let Some(runtime) = PromptRuntime::new() {
            builder = builder.with_runtime(Arc::new(runtime));
        }
        let pc = builder
            .with_configuration(configuration)
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .with_handler(Arc::new(Handler {
                events,
                number,
                bridged: BridgedRelays::of(&bridges),
            }))
            .with_udp_addrs(addrs)
            .build()
            .await
            .map_err(err)?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);

        // Track ids must differ from the other side's, or RTCP for our sender is routed
        // to their track; a random tag per connection guarantees it.
        let tag = signaling_server::ids::random_chars(8);
        let video = add_track(&pc, &tag, RtpCodecKind::Video, h264_codec(), MIME_TYPE_H264).await?;
        // A track's codec is all webrtc-rs offers or accepts for it: the video
        // transceiver is told both, H.264 first (their RTX and FlexFEC come along).
        for transceiver in pc.get_transceivers().await {
            let ours = match transceiver.sender().await {
                Ok(Some(sender)) => sender.id() == video.sender.id(),
                _ => false,
            };
            if ours {
                transceiver
                    .set_codec_preferences(video_codecs())
                    .await
                    .map_err(err)?;
            }
        }
        let audio = add_track(&pc, &tag, RtpCodecKind::Audio, opus_codec(), MIME_TYPE_OPUS).await?;
        let chat = match role {
            Role::Offerer => Some(pc.create_data_channel("chat", None).await.map_err(err)?),
            Role::Answerer => None,
        };
        Ok(Peer {
            pc,
            role,
            video,
            audio,
            chat,
            chain,
            remote_description_set: false,
            pending_candidates: Vec::new(),
            signaled: Vec::new(),
            bridges,
            tag,
            video_codec_chosen: false,
        })
    }

    /// Offerer: creates and applies the offer; returns its SDP.
    pub async fn create_offer(&mut self) -> Result<String, PeerError> {
        let offer = self.pc.create_offer(None).await.map_err(err)?;
        let sdp = offer.sdp.clone();
        self.pc.set_local_description(offer).await.map_err(err)?;
        Ok(sdp)
    }

    /// Offerer: restarts ICE (new credentials; candidates are gathered again, relay ones
    /// included) and returns the new offer's SDP. The call, its tracks and the encoder stay.
    pub async fn restart_ice(&mut self) -> Result<String, PeerError> {
        // Not `pc.restart_ice()` as well: the offer below marks the restart, and setting it
        // rebinds the sockets once, after the restart is applied (both would race).
        let options = rtc::peer_connection::configuration::RTCOfferOptions { ice_restart: true };
        let offer = self.pc.create_offer(Some(options)).await.map_err(err)?;
        let sdp = offer.sdp.clone();
        self.pc.set_local_description(offer).await.map_err(err)?;
        Ok(sdp)
    }

    /// Puts a ceiling on the sending target (None: lifts it); see
    /// [`super::pacer::QueueGuard`].
    pub fn set_send_ceiling(&self, bps: Option<u64>) {
        self.chain.pacer.set_ceiling(bps);
    }

    /// The send pacer seen from outside (its target, whether video is paused).
    pub fn pacer(&self) -> PacerHandle {
        self.chain.pacer.clone()
    }

    /// The share of FEC repair packets to send with the video (0: none).
    pub fn set_fec_overhead(&self, overhead: f64) {
        self.chain.fec.set(overhead);
    }

    /// Takes our outstanding offer back (the other side's offer crossed it and wins).
    pub async fn rollback(&mut self) -> Result<(), PeerError> {
        let rollback = RTCSessionDescription::rollback(None).map_err(err)?;
        self.pc.set_local_description(rollback).await.map_err(err)
    }

    /// The negotiated video codec (H.264 before the other side's description is known).
    pub fn video_codec(&self) -> VideoCodec {
        self.video.video_codec().unwrap_or_default()
    }

    /// Picks the video codec we send from the other side's first description: H.264 when
    /// it has it, else VP8. webrtc-rs binds a sent stream (NACK, TWCC, FEC, our pacer) to
    /// the codec of its track, so for VP8 the sender's track is replaced before the
    /// description is applied; ids and SSRC stay, and so does the bound track object we
    /// write to and read RTCP from (the pipeline packetizes VP8 itself).
    async fn choose_video_codec(&mut self, remote_sdp: &str) -> Result<(), PeerError> {
        if self.video_codec_chosen {
            return Ok(());
        }
        self.video_codec_chosen = true;
        let Some(codec) = choose_video_codec(remote_sdp) else {
            let media: Vec<&str> = remote_sdp
                .lines()
                .filter(|l| l.starts_with("m=") || l.starts_with("a=rtpmap:"))
                .collect();
            tracing::warn!(
                ?media,
                "the other side offers neither H.264 nor VP8: no video"
            );
            return Ok(());
        };
        tracing::info!(%codec, "video codec");
        if codec != self.video_codec() {
            let replacement = TrackLocalStaticSample::new(
                Instant::now(),
                media_stream_track(
                    &self.tag,
                    RtpCodecKind::Video,
                    video_codec(codec),
                    self.video.ssrc,
                ),
            )
            .map_err(err)?;
            self.video
                .sender
                .replace_track(Arc::new(replacement))
                .await
                .map_err(err)?;
        }
        if let Some(cell) = &self.video.video_codec {
            *cell
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = codec;
        }
        Ok(())
    }

    /// Answerer: applies the remote offer and returns the answer's SDP.
    pub async fn accept_offer(&mut self, sdp: String) -> Result<String, PeerError> {
        self.choose_video_codec(&sdp).await?;
        let offer = RTCSessionDescription::offer(sdp).map_err(err)?;
        self.pc.set_remote_description(offer).await.map_err(err)?;
        self.remote_description_set = true;
        self.flush_candidates().await;
        let answer = self.pc.create_answer(None).await.map_err(err)?;
        let sdp = answer.sdp.clone();
        self.pc.set_local_description(answer).await.map_err(err)?;
        Ok(sdp)
    }

    /// Offerer: applies the remote answer.
    pub async fn accept_answer(&mut self, sdp: String) -> Result<(), PeerError> {
        self.choose_video_codec(&sdp).await?;
        let answer = RTCSessionDescription::answer(sdp).map_err(err)?;
        self.pc.set_remote_description(answer).await.map_err(err)?;
        self.remote_description_set = true;
        self.flush_candidates().await;
        Ok(())
    }

    /// A remote candidate: applied now, or queued until the remote description is set
    /// (webrtc-rs would reject and lose it). `None` (end of candidates) needs no action.
    pub async fn add_candidate(&mut self, candidate: Option<IceCandidate>) {
        let Some(c) = candidate else {
            return;
        };
        if self.signaled.len() < MAX_REMOTE_CANDIDATES
            && let Some(end) = CandidateEnd::parse(&c.candidate)
        {
            self.signaled.push(end);
        }
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            username_fragment: c.username_fragment,
            ..Default::default()
        };
        if self.remote_description_set {
            if let Err(e) = self.pc.add_ice_candidate(init).await {
                tracing::debug!(error = %e, "remote candidate not usable");
            }
        } else if self.pending_candidates.len() < MAX_REMOTE_CANDIDATES {
            self.pending_candidates.push(init);
        } else {
            tracing::warn!("too many remote candidates before the description; dropped");
        }
    }

    async fn flush_candidates(&mut self) {
        for init in std::mem::take(&mut self.pending_candidates) {
            if let Err(e) = self.pc.add_ice_candidate(init).await {
                tracing::debug!(error = %e, "queued remote candidate not usable");
            }
        }
    }

    /// Connection statistics right now. `own`: this machine's addresses
    /// ([`usable_addresses`]), to name a peer-reflexive end on one of them.
    pub async fn stats(&self, own: &std::collections::BTreeSet<std::net::IpAddr>) -> PeerStats {
        use webrtc::peer_connection::{RTCStatsReportEntry, StatsSelector};
        let report = self.pc.get_stats(Instant::now(), StatsSelector::None).await;
        let mut stats = PeerStats::default();
        if let Some(t) = report.transport() {
            stats.bytes_sent = t.bytes_sent;
            stats.bytes_received = t.bytes_received;
            if let Some(RTCStatsReportEntry::IceCandidatePair(pair)) =
                report.get(&t.selected_candidate_pair_id)
            {
                stats.rtt_ms = Some(pair.current_round_trip_time * 1000.0);
                // Every candidate of the report, and the two ends of the selected pair.
                let mut known = self.signaled.clone();
                let mut local = None;
                let mut remote = None;
                for e in report.iter() {
                    let (c, is_remote) = match e {
                        RTCStatsReportEntry::LocalCandidate(c) => (c, false),
                        RTCStatsReportEntry::RemoteCandidate(c) => (c, true),
                        _ => continue,
                    };
                    let end = CandidateEnd {
                        address: c.address.clone().unwrap_or_default(),
                        port: c.port,
                        kind: c.candidate_type.to_string(),
                    };
                    let pair_end = if is_remote {
                        &pair.remote_candidate_id
                    } else {
                        &pair.local_candidate_id
                    };
                    let prefix = if is_remote {
                        "RTCRemoteIceCandidate_"
                    } else {
                        "RTCLocalIceCandidate_"
                    };
                    if c.stats.id == *pair_end || c.stats.id == format!("{prefix}{pair_end}") {
                        if is_remote {
                            remote = Some(end.clone());
                        } else {
                            local = Some(end.clone());
                        }
                    }
                    known.push(end);
                }
                // An end the report does not list (a peer-reflexive one learned from the
                // checks): the ICE transport still knows its address.
                if (local.is_none() || remote.is_none())
                    && let Some((l, r)) = self.selected_pair().await
                {
                    local = local.or(Some(l));
                    remote = remote.or(Some(r));
                }
                if remote.as_ref().is_none_or(|r| r.kind == "prflx") {
                    tracing::debug!(?remote, ?known, "peer-reflexive remote end");
                }
                // A relay reached through one of our TCP/TLS bridges.
                let bridged = local.as_ref().and_then(|end| {
                    let ip = end.address.parse::<std::net::IpAddr>().ok()?;
                    let addr = std::net::SocketAddr::new(ip, end.port);
                    self.bridges.iter().find(|b| b.relays(addr))
                });
                stats.local_candidate_type = local.map(|end| end.resolve(&known, own));
                // A remote end that is not in the report at all was learned from the
                // checks themselves and never signaled: peer-reflexive.
                stats.remote_candidate_type = Some(
                    remote
                        .map(|end| end.resolve(&known, own))
                        .unwrap_or_else(|| "prflx".to_owned()),
                );
                stats.candidate_type = path_type(
                    stats.local_candidate_type.as_deref(),
                    stats.remote_candidate_type.as_deref(),
                );
                if let Some(bridge) = bridged
                    && stats.local_candidate_type.as_deref() == Some("relay")
                {
                    stats.candidate_type =
                        Some(format!("relay ({})", bridge.server().transport.name()));
                }
            }
        }
        for s in report.inbound_rtp_streams() {
            stats.packets_lost += s.received_rtp_stream_stats.packets_lost.max(0) as u64;
            stats.packets_received += s.received_rtp_stream_stats.packets_received;
            stats.nacks_sent += u64::from(s.nack_count);
            stats.plis_sent += u64::from(s.pli_count);
            stats.retransmissions_received += s.retransmitted_packets_received;
        }
        stats.fec_packets_sent = self.chain.fec_sent.load(Ordering::Relaxed);
        stats.fec_recovered = self.chain.fec_recovered.load(Ordering::Relaxed);
        // What the other side reports losing of ours (the report blocks of its RTCP
        // sender and receiver reports).
        stats.remote_loss = self.chain.loss.worst();
        for s in report.outbound_rtp_streams() {
            stats.plis_received += u64::from(s.pli_count);
            stats.nacks_received += u64::from(s.nack_count);
            stats.retransmitted_packets += s.retransmitted_packets_sent;
            // One estimate for the connection, reported on every outbound stream.
            if s.target_bitrate > 0.0 {
                stats.estimate_bitrate_bps = Some(s.target_bitrate.round() as u64);
            }
        }
        // What the path carries: GCC's estimate, under the queue guard's ceiling (GCC
        // misses a standing queue).
        let ceiling = [self.chain.pacer.ceiling_bps(), self.chain.pacer.remb_bps()]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        tracing::debug!(
            gcc = ?stats.estimate_bitrate_bps,
            queue_ceiling = ?self.chain.pacer.ceiling_bps(),
            remb = ?self.chain.pacer.remb_bps(),
            paced = ?self.chain.pacer.target_bps(),
            rtt_ms = ?stats.rtt_ms,
            remote_loss = ?stats.remote_loss,
            "send rate"
        );
        if let (Some(estimate), Some(ceiling)) = (stats.estimate_bitrate_bps, ceiling) {
            stats.estimate_bitrate_bps = Some(estimate.min(ceiling.round() as u64));
        }
        stats.target_bitrate_bps = match (stats.estimate_bitrate_bps, self.chain.pacer.target_bps())
        {
            (Some(estimate), Some(paced)) => Some(estimate.min(paced)),
            (estimate, paced) => estimate.or(paced),
        };
        stats
    }

    /// The two ends of the selected candidate pair, from the ICE transport.
    async fn selected_pair(&self) -> Option<(CandidateEnd, CandidateEnd)> {
        let ice = self.pc.sctp().await?.transport().ice_transport();
        let pair = ice.get_selected_candidate_pair().await.ok()??;
        let end = |c: &webrtc::peer_connection::RTCIceCandidate| CandidateEnd {
            address: c.address.clone(),
            port: c.port,
            kind: c.typ.to_string(),
        };
        Some((end(pair.local()), end(pair.remote())))
    }

    /// Closes the connection and ends all its event streams.
    pub async fn close(&self) {
        if let Err(e) = self.pc.close().await {
            tracing::debug!(error = %e, "closing the peer connection");
        }
    }
}

async fn add_track(
    pc: &Arc<dyn PeerConnection>,
    tag: &str,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    mime: &'static str,
) -> Result<LocalTrack, PeerError> {
    let ssrc: SSRC = rand::random();
    let track = Arc::new(
        TrackLocalStaticSample::new(Instant::now(), media_stream_track(tag, kind, codec, ssrc))
            .map_err(err)?,
    );
    let sender = pc
        .add_track(track.clone() as Arc<dyn TrackLocal>)
        .await
        .map_err(err)?;
    Ok(LocalTrack {
        track,
        sender,
        ssrc,
        mime,
        video_codec: (kind == RtpCodecKind::Video)
            .then(|| Arc::new(std::sync::Mutex::new(VideoCodec::H264))),
    })
}

/// The stream and track of ours: ids and SSRC fixed, the codec as given.
fn media_stream_track(
    tag: &str,
    kind: RtpCodecKind,
    codec: RTCRtpCodec,
    ssrc: SSRC,
) -> MediaStreamTrack {
    let id = format!("duet-{tag}-{kind}");
    MediaStreamTrack::new(
        format!("duet-{tag}"),
        id.clone(),
        id,
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )
}

/// One end of a candidate pair: where it is and what kind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateEnd {
    pub address: String,
    pub port: u16,
    /// host, srflx, prflx or relay.
    pub kind: String,
}

impl CandidateEnd {
    /// Reads address, port and type from an SDP candidate attribute
    /// (`candidate:F 1 udp PRIO ADDRESS PORT typ TYPE ...`, with or without `a=`).
    pub fn parse(line: &str) -> Option<CandidateEnd> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let typ = fields.iter().position(|f| *f == "typ")?;
        Some(CandidateEnd {
            address: fields.get(4)?.to_string(),
            port: fields.get(5)?.parse().ok()?,
            kind: fields.get(typ + 1)?.to_string(),
        })
    }

    /// The real type of this end: a peer-reflexive end (learned from a connectivity
    /// check before, or without, its candidate being signaled) takes the type of a known
    /// candidate at the same address and port, when there is one.
    ///
    /// A peer-reflexive end on a loopback address, or on an address of this machine, is a
    /// host end: nothing between two sockets of one machine goes through a NAT. (It
    /// happens when both ends run on one machine: a check answered from a socket and
    /// address the other side never signaled, or before its candidate arrived.)
    pub fn resolve(
        &self,
        known: &[CandidateEnd],
        own: &std::collections::BTreeSet<std::net::IpAddr>,
    ) -> String {
        if self.kind != "prflx" {
            return self.kind.clone();
        }
        if let Some(k) = known
            .iter()
            .find(|k| k.kind != "prflx" && k.address == self.address && k.port == self.port)
        {
            return k.kind.clone();
        }
        let here = self
            .address
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.to_canonical())
            .is_ok_and(|ip| ip.is_loopback() || own.contains(&ip));
        if here { "host" } else { "prflx" }.to_owned()
    }
}

/// The addresses ICE can use on this machine: not loopback, not link-local (what the
/// peer connection binds its sockets to).
pub fn usable_addresses() -> std::collections::BTreeSet<std::net::IpAddr> {
    let Ok(interfaces) = rtc::shared::ifaces::ifaces() else {
        return Default::default();
    };
    interfaces
        .into_iter()
        .filter_map(|i| i.addr.map(|a| a.ip()))
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            std::net::IpAddr::V4(v4) => !v4.is_link_local(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect()
}

/// The path type of a candidate pair from the types of its two ends.
pub fn path_type(local: Option<&str>, remote: Option<&str>) -> Option<String> {
    let ends = [local?, remote.unwrap_or("host")];
    let kind = if ends.contains(&"relay") {
        "relay"
    } else if ends.iter().any(|e| *e == "srflx" || *e == "prflx") {
        "srflx"
    } else {
        "host"
    };
    Some(kind.to_owned())
}

/// How the network looks to a person, for the stats overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkQuality {
    Good,
    Weak,
    Bad,
}

impl NetworkQuality {
    /// From packet loss (fraction), round-trip time and the congestion controller's
    /// estimate: bad when video cannot work well (over 5 % loss, over 400 ms, under
    /// 300 kbit/s), weak when it must give something up (over 1 %, 200 ms, 800 kbit/s).
    pub fn assess(loss: f64, rtt_ms: Option<f64>, target_bps: Option<u64>) -> NetworkQuality {
        let rtt = rtt_ms.unwrap_or(0.0);
        let target = target_bps.unwrap_or(u64::MAX);
        if loss > 0.05 || rtt > 400.0 || target < 300_000 {
            NetworkQuality::Bad
        } else if loss > 0.01 || rtt > 200.0 || target < 800_000 {
            NetworkQuality::Weak
        } else {
            NetworkQuality::Good
        }
    }
}

impl std::fmt::Display for NetworkQuality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkQuality::Good => "good",
            NetworkQuality::Weak => "weak",
            NetworkQuality::Bad => "bad",
        })
    }
}

/// Numbers for the stats overlay and the report.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PeerStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rtt_ms: Option<f64>,
    /// The path of the selected candidate pair: `relay` when either end is a TURN relay
    /// (`relay (tcp)` / `relay (tls)` when ours is reached over TCP/TLS through a
    /// [`TurnBridge`]), else `srflx` when either end is server- or peer-reflexive (through
    /// a NAT), else `host`.
    pub candidate_type: Option<String>,
    /// Our end of the selected pair: host, srflx, prflx or relay.
    pub local_candidate_type: Option<String>,
    /// Their end of the selected pair.
    pub remote_candidate_type: Option<String>,
    pub packets_received: u64,
    pub packets_lost: u64,
    pub nacks_sent: u64,
    pub plis_sent: u64,
    pub plis_received: u64,
    pub nacks_received: u64,
    pub retransmitted_packets: u64,
    /// Repairs that came to us as RTX packets (RFC 4588), unwrapped into the video.
    pub retransmissions_received: u64,
    /// FlexFEC repair packets we sent; lost packets we rebuilt from the other side's.
    pub fec_packets_sent: u64,
    pub fec_recovered: u64,
    /// The congestion controller's estimate of what the path carries (all media).
    pub estimate_bitrate_bps: Option<u64>,
    /// What the sender aims at (all media): the estimate, capped at 1.5 x what was
    /// really sent lately (see [`MediaPacer`]).
    pub target_bitrate_bps: Option<u64>,
    /// The fraction of our packets the other side lost lately (its receiver reports;
    /// the worse of audio and video).
    pub remote_loss: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The video section's codec names, in order (repair formats left out).
    fn video_codecs_in(sdp: &str) -> Vec<String> {
        let mut in_video = false;
        let mut names = Vec::new();
        for line in sdp.lines() {
            if let Some(m) = line.strip_prefix("m=") {
                in_video = m.starts_with("video");
            } else if in_video && let Some(map) = line.strip_prefix("a=rtpmap:") {
                let name = map.split_whitespace().nth(1).unwrap_or("");
                let name = name.split('/').next().unwrap_or("");
                if !["rtx", "flexfec-03", "red", "ulpfec"].contains(&name) {
                    names.push(name.to_owned());
                }
            }
        }
        names
    }

    /// An SDP without the H.264 formats (and their RTX) in its video section: what a
    /// browser without H.264 (Firefox without OpenH264) offers or answers.
    fn without_h264(sdp: &str) -> String {
        let h264: Vec<String> = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("a=rtpmap:"))
            .filter(|m| m.contains(" H264/"))
            .filter_map(|m| m.split_whitespace().next().map(str::to_owned))
            .collect();
        let rtx: Vec<String> = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("a=fmtp:"))
            .filter(|f| h264.iter().any(|pt| f.ends_with(&format!("apt={pt}"))))
            .filter_map(|f| f.split_whitespace().next().map(str::to_owned))
            .collect();
        let gone: Vec<&String> = h264.iter().chain(&rtx).collect();
        let mentions = |l: &str, pt: &str| {
            ["a=rtpmap:", "a=fmtp:", "a=rtcp-fb:"]
                .iter()
                .any(|p| l.starts_with(&format!("{p}{pt} ")))
        };
        sdp.lines()
            .filter(|l| !gone.iter().any(|pt| mentions(l, pt)))
            .map(|l| match l.strip_prefix("m=video ") {
                Some(rest) => {
                    let mut f: Vec<&str> = rest.split(' ').collect();
                    f.retain(|x| !gone.iter().any(|pt| pt.as_str() == *x));
                    format!("m=video {}", f.join(" "))
                }
                None => l.to_owned(),
            })
            .map(|l| l + "\r\n")
            .collect()
    }

    #[test]
    fn the_video_codec_is_h264_when_offered_else_vp8() {
        let section = |codecs: &[(u8, &str)]| {
            let pts: Vec<String> = codecs.iter().map(|(pt, _)| pt.to_string()).collect();
            let mut sdp = format!(
                "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
                 m=video 9 UDP/TLS/RTP/SAVPF {}\r\n",
                pts.join(" ")
            );
            for (pt, name) in codecs {
                sdp += &format!("a=rtpmap:{pt} {name}/90000\r\n");
            }
            sdp
        };
        // Chromium offers VP8 first; H.264 is still what we pick.
        let chromium = section(&[(96, "VP8"), (97, "rtx"), (102, "H264"), (45, "AV1")]);
        assert_eq!(choose_video_codec(&chromium), Some(VideoCodec::H264));
        // Firefox without OpenH264.
        let firefox = section(&[(120, "VP8"), (124, "rtx"), (121, "VP9"), (99, "AV1")]);
        assert_eq!(choose_video_codec(&firefox), Some(VideoCodec::Vp8));
        // ... which offers its later sections with port 0, bundled with the first.
        let bundled = firefox.replace("m=video 9", "m=video 0") + "a=bundle-only\r\n";
        assert_eq!(choose_video_codec(&bundled), Some(VideoCodec::Vp8));
        assert_eq!(choose_video_codec(&section(&[(98, "VP9")])), None);
        // A rejected video section offers nothing.
        let rejected = section(&[(102, "H264")]).replace("m=video 9", "m=video 0");
        assert_eq!(choose_video_codec(&rejected), None);
    }

    /// Two real peer connections negotiate: H.264 when both have it; VP8 when one side
    /// offers only VP8, and when one side answers only VP8 (the track sent is then VP8,
    /// with VP8's payload type).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn negotiation_prefers_h264_and_falls_back_to_vp8() {
        let config = PeerConfig {
            loopback: true,
            ..PeerConfig::default()
        };
        let peer = |role| {
            let config = config.clone();
            async move {
                let (tx, _rx) = mpsc::unbounded_channel();
                Peer::new(role, &config, 1, tx).await.unwrap()
            }
        };

        // Both have H.264: it is chosen, first in the offer and in the answer.
        let mut offerer = peer(Role::Offerer).await;
        let mut answerer = peer(Role::Answerer).await;
        let offer = offerer.create_offer().await.unwrap();
        assert_eq!(video_codecs_in(&offer), ["H264", "VP8"], "{offer}");
        let answer = answerer.accept_offer(offer).await.unwrap();
        assert_eq!(video_codecs_in(&answer)[0], "H264", "{answer}");
        offerer.accept_answer(answer).await.unwrap();
        assert_eq!(offerer.video_codec(), VideoCodec::H264);
        assert_eq!(answerer.video_codec(), VideoCodec::H264);
        assert_eq!(offerer.video.payload_type().await, Some(H264_PT));
        assert_eq!(answerer.video.payload_type().await, Some(H264_PT));
        offerer.close().await;
        answerer.close().await;

        // The offer has VP8 only: the answerer sends VP8, and answers VP8 only.
        let mut offerer = peer(Role::Offerer).await;
        let mut answerer = peer(Role::Answerer).await;
        let offer = without_h264(&offerer.create_offer().await.unwrap());
        assert_eq!(video_codecs_in(&offer), ["VP8"], "{offer}");
        let answer = answerer.accept_offer(offer).await.unwrap();
        assert_eq!(video_codecs_in(&answer), ["VP8"], "{answer}");
        assert_eq!(answerer.video_codec(), VideoCodec::Vp8);
        assert_eq!(answerer.video.payload_type().await, Some(VP8_PT));
        answerer.close().await;

        offerer.close().await;

        // The answer has VP8 only: the offerer sends VP8.
        let mut offerer = peer(Role::Offerer).await;
        let mut answerer = peer(Role::Answerer).await;
        let offer = offerer.create_offer().await.unwrap();
        let answer = without_h264(&answerer.accept_offer(offer).await.unwrap());
        assert_eq!(video_codecs_in(&answer), ["VP8"], "{answer}");
        offerer.accept_answer(answer).await.unwrap();
        assert_eq!(offerer.video_codec(), VideoCodec::Vp8);
        assert_eq!(offerer.video.payload_type().await, Some(VP8_PT));
        offerer.close().await;
        answerer.close().await;
    }

    fn end(address: &str, port: u16, kind: &str) -> CandidateEnd {
        CandidateEnd {
            address: address.into(),
            port,
            kind: kind.into(),
        }
    }

    #[test]
    fn a_candidate_line_gives_address_port_and_type() {
        let line = "candidate:3884125281 1 udp 2130706431 127.0.0.1 50123 typ host";
        assert_eq!(
            CandidateEnd::parse(line),
            Some(end("127.0.0.1", 50123, "host"))
        );
        let relay =
            "a=candidate:1 1 udp 16777215 203.0.113.7 40000 typ relay raddr 0.0.0.0 rport 5";
        assert_eq!(
            CandidateEnd::parse(relay),
            Some(end("203.0.113.7", 40000, "relay"))
        );
        assert_eq!(CandidateEnd::parse("candidate:1 1 udp"), None);
        assert_eq!(
            CandidateEnd::parse("candidate:1 1 udp 1 h nope typ host"),
            None
        );
        assert_eq!(CandidateEnd::parse(""), None);
    }

    #[test]
    fn a_prflx_end_takes_the_type_of_the_candidate_signaled_at_its_address() {
        let none = std::collections::BTreeSet::new();
        let known = [
            end("10.0.0.2", 5000, "host"),
            end("198.51.100.1", 6000, "srflx"),
            end("127.0.0.1", 7000, "prflx"),
        ];
        // Learned from a check before the host candidate arrived: really host.
        assert_eq!(
            end("10.0.0.2", 5000, "prflx").resolve(&known, &none),
            "host"
        );
        assert_eq!(
            end("198.51.100.1", 6000, "prflx").resolve(&known, &none),
            "srflx"
        );
        // Same address, other port (a symmetric NAT's fresh mapping): stays prflx.
        assert_eq!(
            end("198.51.100.1", 6001, "prflx").resolve(&known, &none),
            "prflx"
        );
        // Known types are kept as they are.
        assert_eq!(
            end("203.0.113.7", 1, "relay").resolve(&known, &none),
            "relay"
        );
        // Nothing on loopback is reflexive: a 0.0.0.0 socket answering from 127.0.0.1.
        assert_eq!(
            end("127.0.0.1", 7000, "prflx").resolve(&known, &none),
            "host"
        );
        assert_eq!(end("127.0.0.1", 9999, "prflx").resolve(&[], &none), "host");
        assert_eq!(end("::1", 9999, "prflx").resolve(&[], &none), "host");
        assert_eq!(end("10.0.0.9", 9999, "prflx").resolve(&[], &none), "prflx");
        // An address of this machine: the other end is on this machine too.
        let own = ["10.0.0.9".parse().unwrap()].into_iter().collect();
        assert_eq!(end("10.0.0.9", 9999, "prflx").resolve(&[], &own), "host");
        // Also written as an IPv4-mapped IPv6 address (a dual-stack socket).
        assert_eq!(
            end("::ffff:10.0.0.9", 9999, "prflx").resolve(&[], &own),
            "host"
        );
    }

    #[test]
    fn network_quality_follows_the_worst_signal() {
        use NetworkQuality::*;
        assert_eq!(
            NetworkQuality::assess(0.0, Some(20.0), Some(2_000_000)),
            Good
        );
        assert_eq!(NetworkQuality::assess(0.0, None, None), Good);
        assert_eq!(NetworkQuality::assess(0.02, Some(20.0), None), Weak);
        assert_eq!(NetworkQuality::assess(0.0, Some(250.0), None), Weak);
        assert_eq!(NetworkQuality::assess(0.0, Some(20.0), Some(500_000)), Weak);
        assert_eq!(NetworkQuality::assess(0.08, Some(20.0), None), Bad);
        assert_eq!(NetworkQuality::assess(0.0, Some(20.0), Some(200_000)), Bad);
    }

    #[test]
    fn the_path_is_relay_then_reflexive_then_host() {
        assert_eq!(
            path_type(Some("host"), Some("host")).as_deref(),
            Some("host")
        );
        assert_eq!(
            path_type(Some("host"), Some("prflx")).as_deref(),
            Some("srflx")
        );
        assert_eq!(
            path_type(Some("srflx"), Some("relay")).as_deref(),
            Some("relay")
        );
        assert_eq!(path_type(None, Some("host")), None);
    }
}
