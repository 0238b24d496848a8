//! Retransmissions (RTX, RFC 4588) counted as part of the transport.
//!
//! The crate's NACK responder sends repairs on the stream's RTX SSRC, but its TWCC sender
//! and congestion controller only know the streams they were bound to, so RTX packets
//! left without a transport-wide sequence number. The other side then has packets it
//! cannot report in its TWCC feedback; libwebrtc (Chromium) feeds such packets to its
//! older receive-side estimator and answers with a REMB of about 100 kbit/s, which holds
//! the sender at the bottom of its range (measured on the `home` link: Duet's sending
//! rate toward Chromium fell from ~600 to 100 kbit/s within a second of the first repair).
//!
//! [`WithRtx`] wraps such an interceptor and binds each local stream's RTX SSRC as a
//! stream of its own, with the same header extensions: RTX packets get a transport-wide
//! sequence number, and the congestion controller counts their bytes.

use std::time::Instant;

use rtc::interceptor::{Interceptor, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;

/// An interceptor that also sees each local stream's RTX SSRC as a stream.
pub struct WithRtx<T>(pub T);

/// The RTX stream of `info`, as a stream of its own (None: no RTX negotiated).
pub fn rtx_stream(info: &StreamInfo) -> Option<StreamInfo> {
    let ssrc = info.ssrc_rtx?;
    Some(StreamInfo {
        ssrc,
        payload_type: info.payload_type_rtx.unwrap_or(info.payload_type),
        ssrc_rtx: None,
        payload_type_rtx: None,
        ..info.clone()
    })
}

impl<T> Protocol<TaggedPacket, TaggedPacket, ()> for WithRtx<T>
where
    T: Protocol<
            TaggedPacket,
            TaggedPacket,
            (),
            Rout = TaggedPacket,
            Wout = TaggedPacket,
            Eout = (),
            Time = Instant,
            Error = rtc::shared::error::Error,
        >,
{
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.0.handle_read(msg)
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.0.poll_read()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.0.handle_write(msg)
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.0.poll_write()
    }

    fn handle_event(&mut self, evt: ()) -> Result<(), Self::Error> {
        self.0.handle_event(evt)
    }

    fn poll_event(&mut self) -> Option<()> {
        self.0.poll_event()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), Self::Error> {
        self.0.handle_timeout(now)
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.0.poll_timeout()
    }

    fn close(&mut self) -> Result<(), Self::Error> {
        self.0.close()
    }
}

impl<T: Interceptor> Interceptor for WithRtx<T>
where
    WithRtx<T>: Protocol<
            TaggedPacket,
            TaggedPacket,
            (),
            Rout = TaggedPacket,
            Wout = TaggedPacket,
            Eout = (),
            Time = Instant,
            Error = rtc::shared::error::Error,
        >,
{
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.0.bind_local_stream(info);
        if let Some(rtx) = rtx_stream(info) {
            self.0.bind_local_stream(&rtx);
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_local_stream(info);
        if let Some(rtx) = rtx_stream(info) {
            self.0.unbind_local_stream(&rtx);
        }
    }

    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.bind_remote_stream(info);
    }

    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        self.0.unbind_remote_stream(info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::{AttributedPacket, Packet, RTPHeaderExtension, TwccSenderBuilder};
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
        let mut wrapped = WithRtx(TwccSenderBuilder::new().build());
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
        let mut w = WithRtx(TwccSenderBuilder::new().build());
        w.bind_local_stream(&info);
        w.unbind_local_stream(&info);
        w.handle_write(rtp(2000, 1)).unwrap();
        assert_eq!(w.poll_write().as_ref().and_then(transport_seq), None);
    }
}
