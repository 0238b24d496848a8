// One peer connection with the other member of the room.
//
// Roles as the protocol says: the member who was in the room first offers (and is the
// impolite peer of the perfect-negotiation pattern); the newcomer answers and is polite.
// Like the desktop app, only the offerer starts negotiations: the first offer and, when
// the media path is lost, ICE restarts. The answerer attaches its camera and
// microphone to the transceivers of the offer it receives, so it never needs to offer.
//
// A connection that fails before it ever connected (a DTLS handshake that failed, say) is
// replaced by a fresh one (new certificate, new ICE credentials), at most twice, by
// whichever side notices: its offer names a new DTLS fingerprint, and the other side,
// seeing it, builds a fresh connection too and answers. Descriptions naming the replaced
// connection's fingerprint are dropped.

import { preferCodecs } from './media.js';

/** A connection that stays `disconnected` this long gets an ICE restart (desktop: 2 s). */
const RESTART_AFTER_MS = 2000;
/** While it does not come back, the restart is repeated this often. */
const RESTART_RETRY_MS = 2000;
/** A connection that has not come back after this long ends the call. */
const GIVE_UP_MS = 30000;
/** Chat lines longer than this are cut (as the desktop app does). */
const MAX_CHAT_CHARS = 4096;
/** At most this many fresh connections after failed ones (desktop: the same). */
const MAX_FRESH = 2;

/** The DTLS fingerprint a description names (the first one), or null. */
export function dtlsFingerprint(sdp) {
  const m = /^a=fingerprint:\S+ ([0-9A-Fa-f:]+)\s*$/m.exec(sdp ?? '');
  return m ? m[1].toUpperCase() : null;
}

export class PeerCall {
  /**
   * `events`: `media(state)` with 'connecting' | 'connected' | 'reconnecting' | 'failed',
   * `remoteStream(stream)`, `chat(text)`, `chatOpen()`.
   */
  constructor({ signaling, stream, offerer, iceServers, events }) {
    this.signaling = signaling;
    this.stream = stream;
    this.offerer = offerer;
    this.polite = !offerer;
    this.events = events;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.pendingCandidates = [];
    this.work = Promise.resolve();
    this.chat = null;
    this.wasConnected = false;
    this.downSince = null;
    this.restartTimer = null;
    this.closed = false;
    this.iceServers = iceServers;
    /** This connection's offers are ours to make (the offerer's, or our fresh one's). */
    this.offers = offerer;
    this.fresh = 0;
    this.remoteFingerprint = null;
    this.staleFingerprint = null;
    this.pc = null;
    this.remote = null;
    this.connect();
  }

  /** A new peer connection, its events wired (the old one, if any, closed first). */
  connect() {
    if (this.pc) {
      const old = this.pc;
      old.onicecandidate = old.ontrack = old.ondatachannel = null;
      old.onnegotiationneeded = old.onconnectionstatechange = null;
      if (this.chat) this.chat.onopen = this.chat.onmessage = null;
      old.close();
    }
    this.chat = null;
    this.makingOffer = false;
    this.ignoreOffer = false;
    this.pendingCandidates = [];
    this.remote = new MediaStream();
    const pc = new RTCPeerConnection({ iceServers: this.iceServers, bundlePolicy: 'max-bundle' });
    this.pc = pc;
    pc.onicecandidate = ({ candidate }) => {
      this.signaling.send({
        type: 'candidate',
        candidate: candidate && candidate.candidate
          ? {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdpMid,
            sdp_mline_index: candidate.sdpMLineIndex,
            username_fragment: candidate.usernameFragment,
          }
          : null,
      });
    };
    pc.ontrack = ({ track }) => {
      this.remote.addTrack(track);
      this.events.remoteStream(this.remote);
    };
    pc.ondatachannel = ({ channel }) => {
      if (channel.label === 'chat') this.attachChat(channel);
    };
    pc.onnegotiationneeded = () => this.negotiate();
    pc.onconnectionstatechange = () => this.connectionState();
  }

  /** The offerer adds its media and the chat channel (which starts the negotiation). */
  start() {
    this.events.media('connecting');
    if (!this.offers) return;
    const pc = this.pc;
    for (const kind of ['audio', 'video']) {
      const track = this.stream.getTracks().find((t) => t.kind === kind);
      const t = track
        ? pc.addTransceiver(track, { direction: 'sendrecv', streams: [this.stream] })
        : pc.addTransceiver(kind, { direction: 'recvonly' });
      preferCodecs(t, kind);
    }
    this.attachChat(pc.createDataChannel('chat'));
  }

  async negotiate() {
    // The offerer's ICE restarts are offers too, on a fresh connection the other side
    // started as well.
    if (!(this.offers || this.offerer) || this.closed) return;
    try {
      this.makingOffer = true;
      await this.pc.setLocalDescription();
      this.signaling.send({ type: 'offer', sdp: this.pc.localDescription.sdp });
    } catch (e) {
      console.warn('making an offer', e);
    } finally {
      this.makingOffer = false;
    }
  }

  /** A relayed `offer`, `answer` or `candidate`: handled one at a time, in order. */
  handle(msg) {
    this.work = this.work.then(() => this.apply(msg)).catch((e) => {
      console.warn(`handling ${msg.type}`, e);
      if (msg.type !== 'candidate' && !this.wasConnected) this.fail();
    });
    return this.work;
  }

  async apply(msg) {
    if (this.closed) return;
    const fingerprint = msg.type === 'candidate' ? null : dtlsFingerprint(msg.sdp);
    if (fingerprint && fingerprint === this.staleFingerprint) {
      console.info(`${msg.type} for the replaced connection; dropped`);
      return;
    }
    if (msg.type === 'offer' && fingerprint && this.remoteFingerprint
        && fingerprint !== this.remoteFingerprint) {
      // The other side replaced its connection: a fresh one of ours answers it.
      console.info('the other side started a fresh connection');
      this.renew(false);
    }
    if (msg.type === 'offer' && this.polite && this.offers && !this.remoteFingerprint
        && (this.makingOffer || this.pc.signalingState !== 'stable')) {
      // Our fresh connection's offer crossed theirs: it was never negotiated, so rather
      // than roll it back (its transceivers would not take their offer's media), a fresh
      // one answers theirs.
      console.info('fresh offers crossed: answering theirs on a fresh connection');
      this.renew(false);
    }
    const pc = this.pc;
    if (msg.type === 'offer') {
      const collision = this.makingOffer || pc.signalingState !== 'stable';
      this.ignoreOffer = !this.polite && collision;
      if (this.ignoreOffer) {
        console.info('glare: ignoring the colliding offer (impolite peer)');
        return;
      }
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      if (fingerprint) this.remoteFingerprint = fingerprint;
      await this.attachLocalTracks();
      await this.flushCandidates();
      await pc.setLocalDescription();
      this.signaling.send({ type: 'answer', sdp: pc.localDescription.sdp });
    } else if (msg.type === 'answer') {
      if (pc.signalingState !== 'have-local-offer') {
        console.info('an answer in state', pc.signalingState, '; ignored');
        return;
      }
      await pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      if (fingerprint) this.remoteFingerprint = fingerprint;
      await this.flushCandidates();
    } else if (msg.type === 'candidate') {
      const c = msg.candidate;
      const init = c
        ? {
          candidate: c.candidate,
          sdpMid: c.sdp_mid ?? null,
          sdpMLineIndex: c.sdp_mline_index ?? (c.sdp_mid == null ? 0 : null),
          usernameFragment: c.username_fragment ?? null,
        }
        : null;
      if (!pc.remoteDescription) {
        this.pendingCandidates.push(init);
        return;
      }
      await this.addCandidate(init);
    }
  }

  async flushCandidates() {
    const queued = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const c of queued) await this.addCandidate(c);
  }

  async addCandidate(init) {
    try {
      if (init) await this.pc.addIceCandidate(init);
      else await this.pc.addIceCandidate();
    } catch (e) {
      if (!this.ignoreOffer) console.warn('a remote candidate', e);
    }
  }

  /** The answerer sends on the transceivers the offer created. */
  async attachLocalTracks() {
    for (const t of this.pc.getTransceivers()) {
      const kind = t.receiver.track.kind;
      if (t.sender.track === null && t.currentDirection !== 'stopped') {
        const track = this.stream.getTracks().find((x) => x.kind === kind && !this.sending(x));
        if (track) {
          await t.sender.replaceTrack(track);
          t.sender.setStreams(this.stream);
          t.direction = 'sendrecv';
        }
      }
      if (t.currentDirection === null) preferCodecs(t, kind);
    }
  }

  sending(track) {
    return this.pc.getSenders().some((s) => s.track === track);
  }

  attachChat(channel) {
    this.chat = channel;
    channel.onopen = () => this.events.chatOpen();
    channel.onmessage = ({ data }) => {
      if (typeof data !== 'string') return;
      this.events.chat(data.length > MAX_CHAT_CHARS ? `${data.slice(0, MAX_CHAT_CHARS)}…` : data);
    };
    if (channel.readyState === 'open') this.events.chatOpen();
  }

  sendChat(text) {
    if (!this.chat || this.chat.readyState !== 'open') return false;
    this.chat.send(text);
    return true;
  }

  setMicrophone(on) {
    for (const t of this.stream.getAudioTracks()) t.enabled = on;
  }

  setCamera(on) {
    for (const t of this.stream.getVideoTracks()) t.enabled = on;
  }

  connectionState() {
    if (this.closed) return;
    const state = this.pc.connectionState;
    if (state === 'connected') {
      this.wasConnected = true;
      this.downSince = null;
      clearTimeout(this.restartTimer);
      this.restartTimer = null;
      this.events.media('connected');
    } else if (state === 'disconnected' || state === 'failed') {
      if (!this.wasConnected) {
        if (state !== 'failed') return;
        if (this.fresh >= MAX_FRESH || !this.signaling.open) {
          this.fail();
          return;
        }
        // It never carried media: a fresh connection of ours offers (unless the other
        // side's fresh offer, queued meanwhile, has replaced it already).
        const failed = this.pc;
        this.work = this.work.then(() => {
          if (this.pc !== failed) return;
          this.fresh += 1;
          console.info(`the connection failed before it was up: fresh connection ${this.fresh}`);
          this.renew(true);
        }).catch((e) => {
          console.warn('a fresh connection', e);
          this.fail();
        });
        return;
      }
      if (this.downSince === null) this.downSince = Date.now();
      this.events.media('reconnecting');
      this.scheduleRestart(state === 'failed' ? 0 : RESTART_AFTER_MS);
    }
  }

  /** The offerer restarts ICE while the path is down; anyone gives up after 30 s. */
  scheduleRestart(delay) {
    if (this.restartTimer !== null) return;
    this.restartTimer = setTimeout(() => {
      this.restartTimer = null;
      if (this.closed || this.downSince === null) return;
      if (Date.now() - this.downSince >= GIVE_UP_MS) {
        this.fail();
        return;
      }
      if (this.offerer && this.signaling.open) {
        console.info('restarting ICE');
        this.pc.restartIce();
      }
      this.scheduleRestart(RESTART_RETRY_MS);
    }, delay);
  }

  /**
   * Replaces the connection by a fresh one; `offer`: ours makes the offer (with our media
   * and a chat channel), else the other side's offer follows.
   */
  renew(offer) {
    if (this.closed) return;
    if (this.remoteFingerprint) this.staleFingerprint = this.remoteFingerprint;
    this.remoteFingerprint = null;
    this.offers = offer;
    this.wasConnected = false;
    this.downSince = null;
    clearTimeout(this.restartTimer);
    this.restartTimer = null;
    this.connect();
    this.start();
    this.events.remoteStream(this.remote);
  }

  /** Signaling is back after a drop: a restart that was waiting for it can go now. */
  signalingBack() {
    if (this.downSince !== null && this.offerer && !this.closed) this.pc.restartIce();
  }

  fail() {
    if (this.closed) return;
    this.events.media('failed');
  }

  /** What the stats panel and the tests read: one object, numbers as the browser counts them. */
  async stats() {
    const report = await this.pc.getStats();
    const out = { video_in: null, video_out: null, audio_in: null, audio_out: null, rtt_ms: null, path: null };
    const codecs = new Map();
    let pairId = null;
    report.forEach((s) => {
      if (s.type === 'codec') codecs.set(s.id, `${s.mimeType}${s.sdpFmtpLine ? ` ${s.sdpFmtpLine}` : ''}`);
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    report.forEach((s) => {
      const codec = codecs.get(s.codecId) ?? null;
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        out.video_in = {
          frames_decoded: s.framesDecoded ?? 0, frames_received: s.framesReceived ?? 0,
          frames_dropped: s.framesDropped ?? 0, width: s.frameWidth ?? null, height: s.frameHeight ?? null,
          fps: s.framesPerSecond ?? null, bytes: s.bytesReceived ?? 0, packets: s.packetsReceived ?? 0,
          packets_lost: s.packetsLost ?? 0, freezes: s.freezeCount ?? 0,
          freezes_ms: Math.round((s.totalFreezesDuration ?? 0) * 1000), key_frames: s.keyFramesDecoded ?? 0,
          nacks_sent: s.nackCount ?? 0, plis_sent: s.pliCount ?? 0,
          decoder: s.decoderImplementation ?? null, codec,
        };
      } else if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        out.audio_in = {
          samples: s.totalSamplesReceived ?? 0, concealed: s.concealedSamples ?? 0,
          energy: s.totalAudioEnergy ?? 0, bytes: s.bytesReceived ?? 0, packets: s.packetsReceived ?? 0,
          packets_lost: s.packetsLost ?? 0, codec,
        };
      } else if (s.type === 'outbound-rtp' && s.kind === 'video') {
        out.video_out = {
          frames_sent: s.framesSent ?? 0, frames_encoded: s.framesEncoded ?? 0, width: s.frameWidth ?? null,
          height: s.frameHeight ?? null, fps: s.framesPerSecond ?? null, bytes: s.bytesSent ?? 0,
          packets: s.packetsSent ?? 0, retransmitted_bytes: s.retransmittedBytesSent ?? 0,
          target_bitrate: s.targetBitrate ?? null, key_frames: s.keyFramesEncoded ?? 0,
          nacks_received: s.nackCount ?? 0, plis_received: s.pliCount ?? 0,
          quality_limitation: s.qualityLimitationReason ?? null,
          encoder: s.encoderImplementation ?? null, codec,
        };
      } else if (s.type === 'outbound-rtp' && s.kind === 'audio') {
        out.audio_out = { packets: s.packetsSent ?? 0, bytes: s.bytesSent ?? 0, codec };
      }
    });
    const pair = pairId ? report.get(pairId) : null;
    if (pair) {
      if (pair.currentRoundTripTime !== undefined) out.rtt_ms = pair.currentRoundTripTime * 1000;
      out.available_outgoing_bitrate = pair.availableOutgoingBitrate ?? null;
      const local = report.get(pair.localCandidateId);
      const remote = report.get(pair.remoteCandidateId);
      if (local && remote) {
        out.path = {
          local: local.candidateType, remote: remote.candidateType,
          protocol: local.protocol, relayed: local.candidateType === 'relay' || remote.candidateType === 'relay',
        };
      }
    }
    return out;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.restartTimer);
    if (this.chat) this.chat.close();
    this.pc.close();
  }
}
