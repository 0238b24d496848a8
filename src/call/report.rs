//! The JSON report of a call, built from what the pipelines measured and the peer
//! connection's last statistics.

use std::time::Duration;

use super::peer::PeerStats;
use super::pipelines::MediaStats;
use super::state::{CallState, EndReason};
use crate::media::processing::{ProcessingSettings, ProcessingStatistics};

/// The JSON report of a call.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub end_reason: String,
    pub ended: Option<EndReason>,
    pub time_to_connected_ms: Option<f64>,
    pub time_to_first_frame_ms: Option<f64>,
    /// From both members being in the room to the first decoded frame.
    pub setup_to_first_frame_ms: Option<f64>,
    /// The video codec sent and the one received (H264 or VP8), once known.
    pub video_codec_sent: Option<crate::media::codec::VideoCodec>,
    pub video_codec_received: Option<crate::media::codec::VideoCodec>,
    pub frames_sent: u64,
    pub frames_skipped_by_encoder: u64,
    pub keyframes_sent: u64,
    pub keyframe_requests_received: u64,
    /// Keyframe requests (PLI) we sent: frames really lost, or undecodable.
    pub keyframe_requests_sent: u64,
    pub frames_received: u64,
    /// Frames given up (a packet never came) or dropped while waiting for a keyframe.
    pub frames_broken: u64,
    /// Frames completed by a retransmitted or reordered packet.
    pub frames_repaired: u64,
    pub frames_decoded: u64,
    pub decoded_resolution: Option<(usize, usize)>,
    pub fps_received: Option<f64>,
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p95: Option<f64>,
    pub frames_with_strip: u64,
    pub frames_out_of_order: u64,
    pub frozen_frames: u64,
    /// Freezes as WebRTC statistics define them: count and total duration; and the
    /// longest single one.
    pub freeze_count: u64,
    pub freeze_total_ms: f64,
    pub freeze_longest_ms: f64,
    pub lost_frames: u64,
    pub psnr_db_mean: Option<f64>,
    pub psnr_db_min: Option<f64>,
    pub encode_ms_p50: Option<f64>,
    pub decode_ms_p50: Option<f64>,
    pub audio_frames_sent: u64,
    pub audio_frames_decoded: u64,
    pub audio_frames_concealed: u64,
    /// The audio jitter buffer at the end: the delay it aimed at (from the measured
    /// jitter), packets that came after their turn, frames concealed while waiting for a
    /// held-back packet, packets dropped to bring the delay back down.
    pub audio_jitter_target_ms: u64,
    pub audio_late_packets: u64,
    pub audio_stretched_frames: u64,
    pub audio_skipped_packets: u64,
    pub audio_dominant_hz: Option<f64>,
    pub bitrate_sent_kbps: Option<f64>,
    pub bitrate_received_kbps: Option<f64>,
    pub rtt_ms: Option<f64>,
    /// The path: host, srflx or relay (relay when either end is a TURN relay).
    pub candidate_type: Option<String>,
    pub local_candidate_type: Option<String>,
    pub remote_candidate_type: Option<String>,
    pub packets_lost: u64,
    /// Video packets we asked for again (NACK), and NACKs the other side sent us.
    pub nacks_sent: u64,
    pub nacks_received: u64,
    pub retransmitted_packets: u64,
    /// Repairs the other side sent us over RTX (RFC 4588).
    pub retransmissions_received: u64,
    /// FlexFEC repair packets we sent; lost packets we rebuilt from the other side's FEC.
    pub fec_packets_sent: u64,
    pub fec_recovered: u64,
    /// REMBs this side sent: its incoming direction was queued ("send at most this").
    pub rate_requests_sent: u64,
    /// ICE restarts this side made; signaling connections that resumed our seat.
    pub ice_restarts: u64,
    /// Peer connections replaced by fresh ones (one failed before it carried media: a
    /// DTLS handshake that failed, or one that never came up), started by either side.
    pub fresh_connections: u64,
    pub signaling_resumes: u64,
    /// The congestion controller's last estimate (all media), kbit/s.
    pub estimate_bitrate_kbps: Option<f64>,
    /// The last sending target (the estimate capped by what was really sent), kbit/s.
    pub target_bitrate_kbps: Option<f64>,
    /// One sample per second: estimate, rates, RTT, repair counters.
    pub timeline: Vec<crate::call::pipelines::Second>,
    pub chat_sent: Vec<String>,
    pub chat_received: Vec<String>,
    pub warnings: Vec<String>,
    /// CPU of the whole process while in the call, percent of one core (headless only).
    pub process_cpu_percent: Option<f64>,
    /// Peak resident memory of the process, MiB (headless only).
    pub process_peak_rss_mib: Option<f64>,
    /// The microphone clean-up, when it ran.
    pub audio_processing: Option<ProcessingReport>,
    /// The mean level of what was sent, and of what was received, while someone spoke
    /// (dBFS; none if nobody did).
    pub speech_sent_dbfs: Option<f64>,
    pub speech_received_dbfs: Option<f64>,
}

/// The microphone clean-up in a call's report: which stages ran, what the echo canceller
/// says of itself at the end, and its CPU time per 20 ms frame.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProcessingReport {
    pub echo_cancellation: bool,
    pub noise_suppression: bool,
    pub auto_gain: bool,
    /// Echo return loss enhancement: how much echo is removed, dB.
    pub erle_db: Option<f64>,
    /// How likely echo is left in what is sent, 0-1.
    pub residual_echo_likelihood: Option<f64>,
    /// The speaker-to-microphone delay the canceller found, ms.
    pub echo_delay_ms: Option<i32>,
    pub ms_per_frame_p50: Option<f64>,
    pub ms_per_frame_p95: Option<f64>,
}

fn percentile_ms(values_us: &[u32], p: f64) -> Option<f64> {
    if values_us.is_empty() {
        return None;
    }
    let mut v = values_us.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Some(f64::from(v[i]) / 1000.0)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

impl Report {
    pub(super) fn failed(reason: String) -> Report {
        Report {
            end_reason: reason,
            ..Report::default()
        }
    }

    pub(super) fn from_stats(
        s: &MediaStats,
        peer: &PeerStats,
        state: &CallState,
        warnings: &[String],
        processing: Option<(ProcessingSettings, ProcessingStatistics)>,
    ) -> Report {
        let (end_reason, ended) = match state {
            CallState::Ended(r) => (r.to_string(), Some(r.clone())),
            other => (other.describe(), None),
        };
        let active = match (s.first_decoded_at, s.last_decoded_at) {
            (Some(a), Some(b)) if b > a => Some(b - a),
            _ => None,
        };
        let media_secs = s
            .connected_after
            .map(|c| s.started.elapsed().saturating_sub(c).as_secs_f64())
            .filter(|&x| x > 0.0);
        Report {
            end_reason,
            ended,
            time_to_connected_ms: s.connected_after.map(ms),
            time_to_first_frame_ms: s.first_frame_after.map(ms),
            setup_to_first_frame_ms: match (s.both_in_room_at, s.first_decoded_at) {
                (Some(a), Some(b)) => Some(ms(b.saturating_duration_since(a))),
                _ => None,
            },
            video_codec_sent: s.video_codec_sent,
            video_codec_received: s.video_codec_received,
            frames_sent: s.video_frames_sent,
            frames_skipped_by_encoder: s.video_frames_skipped,
            keyframes_sent: s.keyframes_sent,
            keyframe_requests_received: s.keyframe_requests_received,
            keyframe_requests_sent: s.keyframe_requests_sent,
            frames_received: s.video_frames_received,
            frames_broken: s.video_frames_broken,
            frames_repaired: s.video_frames_repaired,
            frames_decoded: s.video_frames_decoded,
            decoded_resolution: (s.decoded_width > 0)
                .then_some((s.decoded_width, s.decoded_height)),
            fps_received: active.filter(|d| d.as_secs_f64() > 0.5).map(|d| {
                ((s.video_frames_decoded - 1) as f64 / d.as_secs_f64() * 10.0).round() / 10.0
            }),
            latency_ms_p50: percentile_ms(&s.latencies_us, 0.5),
            latency_ms_p95: percentile_ms(&s.latencies_us, 0.95),
            frames_with_strip: s.strip_frames,
            frames_out_of_order: s.frames_out_of_order,
            frozen_frames: s.frozen_frames,
            freeze_count: s.freezes.count,
            freeze_total_ms: ms(s.freezes.total),
            freeze_longest_ms: ms(s.freezes.longest),
            lost_frames: s.lost_frames,
            psnr_db_mean: (!s.psnr_db.is_empty())
                .then(|| s.psnr_db.iter().sum::<f64>() / s.psnr_db.len() as f64),
            psnr_db_min: s.psnr_db.iter().copied().reduce(f64::min),
            encode_ms_p50: percentile_ms(&s.encode_us, 0.5),
            decode_ms_p50: percentile_ms(&s.decode_us, 0.5),
            audio_frames_sent: s.audio_frames_sent,
            audio_frames_decoded: s.audio_frames_decoded,
            audio_frames_concealed: s.audio_frames_concealed,
            audio_jitter_target_ms: s.audio_jitter_target.as_millis() as u64,
            audio_late_packets: s.audio_jitter_stats.late,
            audio_stretched_frames: s.audio_jitter_stats.stretched,
            audio_skipped_packets: s.audio_jitter_stats.skipped,
            audio_dominant_hz: (s.audio_tail.len() >= 4800).then(|| {
                let tail: Vec<i16> = s.audio_tail.iter().copied().collect();
                crate::media::audio::dominant_frequency(&tail)
            }),
            bitrate_sent_kbps: media_secs
                .map(|t| (peer.bytes_sent as f64 * 8.0 / t / 1000.0).round()),
            bitrate_received_kbps: media_secs
                .map(|t| (peer.bytes_received as f64 * 8.0 / t / 1000.0).round()),
            rtt_ms: peer.rtt_ms,
            candidate_type: peer.candidate_type.clone(),
            local_candidate_type: peer.local_candidate_type.clone(),
            remote_candidate_type: peer.remote_candidate_type.clone(),
            packets_lost: peer.packets_lost,
            nacks_sent: s.nacked_packets,
            nacks_received: peer.nacks_received,
            retransmitted_packets: peer.retransmitted_packets,
            retransmissions_received: peer.retransmissions_received,
            fec_packets_sent: peer.fec_packets_sent,
            fec_recovered: peer.fec_recovered,
            rate_requests_sent: s.rate_requests_sent,
            ice_restarts: s.ice_restarts,
            fresh_connections: s.fresh_connections,
            signaling_resumes: s.signaling_resumes,
            estimate_bitrate_kbps: peer
                .estimate_bitrate_bps
                .map(|b| (b as f64 / 1000.0).round()),
            target_bitrate_kbps: peer.target_bitrate_bps.map(|b| (b as f64 / 1000.0).round()),
            timeline: s.timeline.clone(),
            chat_sent: s.chat_sent.clone(),
            chat_received: s.chat_received.clone(),
            warnings: warnings.to_vec(),
            process_cpu_percent: None,
            process_peak_rss_mib: None,
            audio_processing: processing.map(|(settings, stats)| ProcessingReport {
                echo_cancellation: settings.echo_cancellation,
                noise_suppression: settings.noise_suppression,
                auto_gain: settings.auto_gain,
                erle_db: stats.echo_return_loss_enhancement_db,
                residual_echo_likelihood: stats.residual_echo_likelihood,
                echo_delay_ms: stats.delay_ms,
                ms_per_frame_p50: percentile_ms(&s.processing_us, 0.5),
                ms_per_frame_p95: percentile_ms(&s.processing_us, 0.95),
            }),
            speech_sent_dbfs: s.speech_sent.dbfs(),
            speech_received_dbfs: s.speech_received.dbfs(),
        }
    }
}
