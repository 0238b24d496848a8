// The Duet web client: the start page (`/`), the lobby of a join link (`/r/<room>`), the
// call view, and direct calls by name. It speaks the signaling protocol of
// docs/PROTOCOL.md over one WebSocket, like the desktop app.

import { Signaling } from './signaling.js';
import { PeerCall } from './call.js';
import { openDevices, listDevices, levelMeter, dominantFrequency } from './media.js';
import { errorSentence, endSentence, localTime } from './words.js';

const $ = (id) => document.getElementById(id);

/** Everything the page knows. `call` is null outside a call. */
const app = {
  room: roomFromPath(location.pathname),
  stream: null,
  meter: null,
  sig: null,
  signedIn: null,
  incoming: null,
  ring: null,
  call: null,
  lastEnded: null,
  /** Seats taken back with `resume` after the WebSocket dropped. */
  resumes: 0,
  /** Settles when the camera and microphone are open (or failed to open). */
  devicesReady: Promise.resolve(),
};

/**
 * The call: `phase` is 'joining' | 'dialing' | 'ringing' | 'waiting' | 'connecting' |
 * 'connected' | 'reconnecting' | 'ended'.
 */
function newCall(room, extra = {}) {
  return {
    room, phase: 'joining', peerId: null, peerName: null, myId: null, host: false,
    peer: null, endingByMe: false, peerAway: false, signalingDown: false, chat: [],
    finalStats: null, endedWhy: null, ...extra,
  };
}

function roomFromPath(path) {
  const m = /^\/r\/([^/?#]+)\/?$/.exec(path);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return null;
  }
}

/** What a person pastes: a join link, or a room name / meeting id. */
function roomFromInput(text) {
  const t = text.trim();
  const at = t.indexOf('/r/');
  if (at >= 0) return t.slice(at + 3).split(/[/?#]/)[0];
  return t;
}

function hostTokenFor(room) {
  const fragment = new URLSearchParams(location.hash.slice(1)).get('host');
  if (fragment) {
    localStorage.setItem(`duet.host.${room}`, fragment);
    // The token is a secret: keep it out of the address bar (and out of shared links).
    history.replaceState(null, '', location.pathname);
  }
  return localStorage.getItem(`duet.host.${room}`);
}

function notice(text, kind = '') {
  const el = $('notice');
  el.textContent = text;
  el.className = `banner ${kind}`;
  el.hidden = !text;
}

// ---------------------------------------------------------------- devices and lobby

async function startDevices() {
  const cameraId = $('camera').value || undefined;
  const micId = $('microphone').value || undefined;
  if (app.meter) app.meter.stop();
  if (app.stream) for (const t of app.stream.getTracks()) t.stop();
  app.stream = null;
  try {
    app.stream = await openDevices(cameraId, micId);
    $('device-error').hidden = true;
  } catch (e) {
    $('device-error').textContent = `Could not open the camera or microphone: ${e.message}.`;
    $('device-error').hidden = false;
    return;
  }
  $('preview').srcObject = app.stream;
  app.meter = levelMeter(app.stream, $('level'));
  const cam = app.stream.getVideoTracks()[0]?.getSettings().deviceId;
  const mic = app.stream.getAudioTracks()[0]?.getSettings().deviceId;
  await listDevices($('camera'), 'videoinput', cam);
  await listDevices($('microphone'), 'audioinput', mic);
}

async function showLobby() {
  $('lobby').hidden = false;
  $('call').hidden = true;
  $('home').hidden = app.room !== null;
  $('room-join').hidden = app.room === null;
  document.title = app.room ? `Duet: ${app.room}` : 'Duet';
  if (app.room) await describeRoom(app.room);
}

async function describeRoom(room) {
  $('room-title').textContent = `Room ${room}`;
  const link = `${location.origin}/r/${encodeURIComponent(room)}`;
  $('invite-link').value = link;
  $('invite').hidden = false;
  let info = '';
  try {
    const response = await fetch(`/api/rooms/${encodeURIComponent(room)}`);
    if (response.ok) {
      const r = await response.json();
      if (r.title) $('room-title').textContent = r.title;
      if (r.state === 'scheduled') info = `This meeting opens at ${localTime(r.starts_at)}.`;
      else if (r.state === 'ended') info = 'This meeting has ended.';
      else if (r.state === 'active') info = r.members >= 2 ? 'Two people are in this room already.' : 'Someone is waiting for you.';
      else info = 'Nobody is here yet.';
    } else if (response.status === 404) {
      info = 'A new room: whoever joins first is its host.';
    }
  } catch (e) {
    console.info('room info', e);
  }
  if (hostTokenFor(room)) info += ' You are its host.';
  $('room-info').textContent = info;
}

// ---------------------------------------------------------------- signaling

async function ensureSignaling() {
  if (app.sig && app.sig.open) return app.sig;
  const sig = new Signaling(onServerMessage, onSignalingStatus);
  await sig.connect();
  app.sig = sig;
  return sig;
}

function onSignalingStatus(status, detail) {
  const call = app.call;
  if (status === 'reconnecting') {
    if (call) {
      call.signalingDown = true;
      render();
    }
  } else if (status === 'resumed') {
    if (app.signedIn) app.sig.send({ type: 'register', name: app.signedIn });
  } else if (status === 'lost') {
    if (app.signedIn) {
      app.signedIn = null;
      renderSignedIn();
    }
    if (call && call.phase !== 'ended') {
      if (call.peer && (call.phase === 'connected' || call.phase === 'reconnecting')) {
        // The media is peer to peer: the call goes on, without signaling.
        call.signalingDown = false;
        notice('Lost the connection to the server; the call goes on while the media path holds.', 'warn');
        render();
      } else {
        endCall({ kind: 'server_lost' }, false);
      }
    } else {
      notice(`Lost the connection to the server (${detail}).`, 'warn');
    }
  }
}

function onServerMessage(msg) {
  const call = app.call;
  switch (msg.type) {
    case 'registered':
      app.signedIn = msg.name;
      renderSignedIn();
      return;
    case 'incoming_call':
      if (call && call.phase !== 'ended') {
        app.sig.send({ type: 'reject', call_id: msg.call_id });
        return;
      }
      app.incoming = { call_id: msg.call_id, from: msg.from };
      renderIncoming();
      return;
    case 'call_cancelled':
      if (app.incoming && app.incoming.call_id === msg.call_id) {
        const from = app.incoming.from;
        app.incoming = null;
        renderIncoming();
        notice(`${from} gave up before you answered.`);
      }
      return;
    default:
  }
  if (!call || call.ending) {
    if (msg.type === 'error') notice(errorSentence(msg, { name: $('name').value.trim() }), 'error');
    return;
  }
  switch (msg.type) {
    case 'ringing':
      call.phase = 'ringing';
      call.room = msg.call_id;
      break;
    case 'call_rejected':
      endCall({ kind: 'rejected', reason: msg.reason, to: call.dialing }, false);
      return;
    case 'joined': {
      const resumed = call.myId !== null && call.myId === msg.peer_id;
      call.room = msg.room;
      call.myId = msg.peer_id;
      call.host = msg.host;
      app.sig.seat = msg.resume_token ? { room: msg.room, peer_id: msg.peer_id, resume_token: msg.resume_token } : null;
      if (resumed) {
        app.resumes += 1;
        call.signalingDown = false;
        if (call.peer) call.peer.signalingBack();
        break;
      }
      const other = msg.peers && msg.peers[0];
      if (other) {
        call.peerId = other.peer_id;
        call.peerName = other.name ?? call.peerName;
      }
      if (call.phase === 'ringing' || call.phase === 'dialing') {
        call.phase = 'ringing';
      } else if (msg.members >= 2) {
        startPeer(false);
      } else {
        call.phase = 'waiting';
      }
      break;
    }
    case 'peer_joined':
      call.peerId = msg.peer_id;
      call.peerName = msg.name ?? call.peerName;
      if (!call.peer) startPeer(true);
      break;
    case 'peer_reconnecting':
      // Their WebSocket dropped; the media goes on peer to peer. The server says nothing
      // when they are back, so this is a notice, cleared by the next thing they send.
      call.peerAway = true;
      notice(`${call.peerName || 'The other person'} lost the connection to the server and is reconnecting; the call goes on.`);
      break;
    case 'offer':
    case 'answer':
    case 'candidate':
      if (call.peerAway) {
        call.peerAway = false;
        notice('');
      }
      if (call.peer) call.peer.handle(msg);
      break;
    case 'peer_left':
      endCall({ kind: 'peer_left', reason: msg.reason }, false);
      return;
    case 'host_changed':
      call.host = msg.peer_id === call.myId;
      break;
    case 'room_full':
      endCall({ kind: 'room_full' }, false);
      return;
    case 'room_ended':
      endCall({ kind: 'room_ended', reason: msg.reason, byMe: call.endingByMe }, false);
      return;
    case 'error':
      if (call.phase === 'joining' || call.phase === 'dialing') {
        endCall({ kind: 'refused', msg, context: { joining: true, name: $('name').value.trim() } }, false);
        return;
      }
      if (msg.code === 'resume_failed') {
        app.sig.seat = null;
        onSignalingStatus('lost', msg.message);
        return;
      }
      if (msg.code !== 'not_in_call') notice(errorSentence(msg), 'error');
      break;
    default:
      console.debug('unhandled message', msg.type);
  }
  render();
}

// ---------------------------------------------------------------- the call

async function beginCall(call, first) {
  await app.devicesReady;
  if (!app.stream) app.devicesReady = startDevices();
  await app.devicesReady;
  if (!app.stream) {
    notice('Allow the camera or microphone to make a call.', 'error');
    return;
  }
  notice('');
  let sig;
  try {
    sig = await ensureSignaling();
  } catch (e) {
    notice(`Cannot reach the server: ${e.message}.`, 'error');
    return;
  }
  app.call = call;
  showCall();
  render();
  sig.send(first);
}

async function joinRoom() {
  const name = $('name').value.trim();
  localStorage.setItem('duet.name', name);
  const msg = { type: 'join', room: app.room };
  if (name) msg.name = name;
  const token = hostTokenFor(app.room);
  if (token) msg.host_token = token;
  await beginCall(newCall(app.room), msg);
}

async function dial(to) {
  if (!app.signedIn) {
    notice('Sign in with your name first: the person you call sees it.', 'error');
    return;
  }
  await beginCall(newCall(null, { phase: 'dialing', dialing: to, peerName: to }), { type: 'call', to });
}

async function acceptIncoming() {
  const incoming = app.incoming;
  if (!incoming) return;
  app.incoming = null;
  renderIncoming();
  await beginCall(newCall(incoming.call_id, { peerName: incoming.from }), { type: 'accept', call_id: incoming.call_id });
}

function declineIncoming() {
  if (!app.incoming) return;
  app.sig.send({ type: 'reject', call_id: app.incoming.call_id });
  app.incoming = null;
  renderIncoming();
}

function startPeer(offerer) {
  const call = app.call;
  call.phase = 'connecting';
  call.peer = new PeerCall({
    signaling: app.sig,
    stream: app.stream,
    offerer,
    iceServers: app.sig.iceServers,
    events: {
      media(state) {
        if (app.call !== call || call.phase === 'ended') return;
        if (state === 'failed') {
          endCall({ kind: 'media_failed' }, true);
          return;
        }
        call.phase = state;
        render();
      },
      remoteStream(stream) {
        const video = $('remote');
        if (video.srcObject !== stream) video.srcObject = stream;
        video.play().catch(() => {});
      },
      chat(text) {
        call.chat.push({ mine: false, text });
        renderChat();
      },
      chatOpen() {
        $('chat-input').disabled = false;
        $('chat-send').disabled = false;
      },
    },
  });
  call.peer.start();
  applyToggles();
}

async function endCall(why, leave) {
  const call = app.call;
  if (!call || call.ending) return;
  call.ending = true;
  if (call.peerAway) notice('');
  if (leave && app.sig) app.sig.send({ type: 'leave' });
  if (app.sig) app.sig.seat = null;
  if (call.peer) {
    // The last numbers, for the stats panel's readers (and the tests).
    call.finalStats = await call.peer.stats().catch(() => null);
    call.peer.close();
  }
  call.phase = 'ended';
  call.endedWhy = why;
  app.lastEnded = call;
  $('remote').srcObject = null;
  render();
}

function showCall() {
  $('lobby').hidden = true;
  $('call').hidden = false;
  $('ended').hidden = true;
  $('chat-log').replaceChildren();
  $('chat-input').disabled = true;
  $('chat-send').disabled = true;
  $('self').srcObject = app.stream;
}

const toggles = { mic: true, cam: true };

function applyToggles() {
  const peer = app.call?.peer;
  for (const t of app.stream?.getAudioTracks() ?? []) t.enabled = toggles.mic;
  for (const t of app.stream?.getVideoTracks() ?? []) t.enabled = toggles.cam;
  if (peer) {
    peer.setMicrophone(toggles.mic);
    peer.setCamera(toggles.cam);
  }
  $('mic').textContent = toggles.mic ? 'Mute' : 'Unmute';
  $('mic').setAttribute('aria-pressed', String(toggles.mic));
  $('cam').textContent = toggles.cam ? 'Camera off' : 'Camera on';
  $('cam').setAttribute('aria-pressed', String(toggles.cam));
}

// ---------------------------------------------------------------- drawing

function stateLine(call) {
  const who = call.peerName || 'the other person';
  switch (call.phase) {
    case 'joining': return 'Joining…';
    case 'dialing': return `Calling ${who}…`;
    case 'ringing': return `Ringing ${who}…`;
    case 'waiting': return 'Waiting for the other person to join…';
    case 'connecting': return `Connecting to ${who}…`;
    case 'connected':
      if (call.signalingDown) return `Connected to ${who}; reconnecting to the server…`;
      return `Connected to ${who}`;
    case 'reconnecting': return `Reconnecting to ${who}…`;
    case 'ended': return `Ended: ${endSentence(call.endedWhy, call.peerName || 'The other person')}`;
    default: return call.phase;
  }
}

function render() {
  const call = app.call;
  if (!call) return;
  $('state-line').textContent = stateLine(call);
  $('state-line').dataset.phase = call.phase;
  $('end-meeting').hidden = !(call.host && call.phase !== 'ended' && call.phase !== 'ringing' && call.phase !== 'dialing');
  $('ended').hidden = call.phase !== 'ended';
  $('ended-why').textContent = call.phase === 'ended' ? endSentence(call.endedWhy, call.peerName || 'The other person') : '';
  $('hang-up').disabled = call.phase === 'ended';
}

function renderChat() {
  const log = $('chat-log');
  log.replaceChildren(...(app.call?.chat ?? []).map((line) => {
    const li = document.createElement('li');
    li.className = line.mine ? 'mine' : 'theirs';
    li.textContent = line.text;
    return li;
  }));
  log.scrollTop = log.scrollHeight;
}

function renderSignedIn() {
  $('who').textContent = app.signedIn ? `Signed in as ${app.signedIn}` : '';
  $('sign-in').hidden = app.signedIn !== null;
  $('dial-form').hidden = app.signedIn === null;
}

function renderIncoming() {
  const incoming = app.incoming;
  $('incoming').hidden = !incoming;
  if (incoming) {
    $('incoming-text').textContent = `${incoming.from} is calling you.`;
    if (!app.ring) {
      app.ring = new Audio('/app/ring.wav');
      app.ring.loop = true;
    }
    app.ring.currentTime = 0;
    app.ring.play().catch((e) => console.info('ring sound blocked', e));
  } else if (app.ring) {
    app.ring.pause();
  }
}

const previous = new Map();

/** "H264 42e01f" from "video/H264 level-asymmetry-allowed=1;...;profile-level-id=42e01f". */
function codecName(codec) {
  if (!codec) return '?';
  const [mime, fmtp = ''] = codec.split(' ');
  const profile = /profile-level-id=([0-9a-f]+)/i.exec(fmtp);
  return `${mime.split('/')[1] ?? mime}${profile ? ` ${profile[1]}` : ''}`;
}

// Sampled every second even while the panel is closed, so bitrates show at once.
async function renderStats() {
  const peer = app.call?.peer;
  if (!peer || app.call.phase === 'ended') return;
  const s = await peer.stats();
  const now = performance.now();
  const rate = (key, bytes) => {
    const before = previous.get(key);
    previous.set(key, { bytes, at: now });
    if (!before || now <= before.at) return '…';
    return `${Math.round(((bytes - before.bytes) * 8) / (now - before.at))} kbit/s`;
  };
  const rows = [];
  if (s.video_in) {
    const v = s.video_in;
    const lost = v.packets + v.packets_lost > 0 ? (100 * v.packets_lost) / (v.packets + v.packets_lost) : 0;
    rows.push(['Receiving', `${v.width ?? '?'}×${v.height ?? '?'} at ${v.fps ?? 0} fps`],
      ['Received bitrate', rate('in', v.bytes + (s.audio_in?.bytes ?? 0))],
      ['Loss', `${lost.toFixed(1)} %`],
      ['Codecs', `${codecName(v.codec)}, ${codecName(s.audio_in?.codec)}`]);
  }
  if (s.video_out) {
    rows.push(['Sending', `${s.video_out.width ?? '?'}×${s.video_out.height ?? '?'} at ${s.video_out.fps ?? 0} fps`],
      ['Sent bitrate', rate('out', s.video_out.bytes + (s.audio_out?.bytes ?? 0))]);
  }
  if ($('stats-panel').hidden) return;
  const rtt = s.rtt_ms;
  rows.push(['Round trip', rtt === null ? '…' : `${rtt < 1 ? '< 1' : Math.round(rtt)} ms`]);
  if (s.path) {
    rows.push(['Path', `${s.path.relayed ? 'relayed (TURN)' : 'direct'}: ${s.path.local} → ${s.path.remote} over ${s.path.protocol}`]);
  }
  $('stats').replaceChildren(...rows.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    return [dt, dd];
  }));
}

// ---------------------------------------------------------------- wiring

function wire() {
  $('insecure').hidden = window.isSecureContext;
  $('name').value = localStorage.getItem('duet.name') ?? '';
  $('camera').onchange = () => { app.devicesReady = startDevices(); };
  $('microphone').onchange = () => { app.devicesReady = startDevices(); };
  $('join').onclick = joinRoom;
  $('copy-link').onclick = () => navigator.clipboard?.writeText($('invite-link').value);
  $('room-form').onsubmit = (e) => {
    e.preventDefault();
    const room = roomFromInput($('room').value);
    if (!room) return;
    app.room = room;
    history.pushState(null, '', `/r/${encodeURIComponent(room)}`);
    showLobby().then(joinRoom);
  };
  $('new-meeting').onclick = async () => {
    try {
      const response = await fetch('/api/rooms', { method: 'POST', body: '{}' });
      const body = await response.json();
      if (!response.ok) throw new Error(body.message ?? response.statusText);
      localStorage.setItem(`duet.host.${body.room_id}`, body.host_token);
      app.room = body.room_id;
      history.pushState(null, '', `/r/${encodeURIComponent(body.room_id)}`);
      await showLobby();
    } catch (e) {
      notice(`Could not create a meeting: ${e.message}.`, 'error');
    }
  };
  $('sign-in').onclick = async () => {
    const name = $('name').value.trim();
    if (!name) {
      notice('Type your name first: that is the name people call.', 'error');
      return;
    }
    localStorage.setItem('duet.name', name);
    try {
      const sig = await ensureSignaling();
      sig.send({ type: 'register', name });
    } catch (e) {
      notice(`Cannot reach the server: ${e.message}.`, 'error');
    }
  };
  $('dial-form').onsubmit = (e) => {
    e.preventDefault();
    const to = $('callee').value.trim();
    if (to) dial(to);
  };
  $('accept').onclick = acceptIncoming;
  $('decline').onclick = declineIncoming;
  $('mic').onclick = () => {
    toggles.mic = !toggles.mic;
    applyToggles();
  };
  $('cam').onclick = () => {
    toggles.cam = !toggles.cam;
    applyToggles();
  };
  $('hang-up').onclick = () => endCall({ kind: 'hung_up' }, true);
  $('end-meeting').onclick = () => {
    if (!app.call) return;
    app.call.endingByMe = true;
    app.sig.send({ type: 'end_room' });
  };
  // One panel beside (on phones: below) the video: chat or stats.
  $('chat-toggle').onclick = () => {
    $('chat-panel').hidden = !$('chat-panel').hidden;
    $('stats-panel').hidden = true;
  };
  $('stats-toggle').onclick = () => {
    $('stats-panel').hidden = !$('stats-panel').hidden;
    $('chat-panel').hidden = true;
    renderStats();
  };
  $('chat-form').onsubmit = (e) => {
    e.preventDefault();
    const text = $('chat-input').value;
    const call = app.call;
    if (!text || !call?.peer) return;
    if (call.peer.sendChat(text)) {
      call.chat.push({ mine: true, text });
      $('chat-input').value = '';
      renderChat();
    }
  };
  $('back').onclick = () => {
    app.call = null;
    showLobby();
  };
  window.onpopstate = () => {
    app.room = roomFromPath(location.pathname);
    if (!app.call || app.call.phase === 'ended') showLobby();
  };
  setInterval(renderStats, 1000);
}

// What tests and curious people can read; only dropSignaling acts (as a network drop would).
window.duet = {
  phase: () => app.call?.phase ?? 'idle',
  stateLine: () => $('state-line').textContent,
  signedIn: () => app.signedIn,
  incoming: () => app.incoming,
  ringing: () => Boolean(app.ring && !app.ring.paused),
  resumes: () => app.resumes,
  /** Cuts the WebSocket as a network drop would (no `leave`): the seat is resumed. */
  dropSignaling: () => app.sig?.ws?.close(4000, 'dropped for a test'),
  host: () => app.call?.host ?? false,
  chat: () => (app.call ?? app.lastEnded)?.chat ?? [],
  async stats() {
    const call = app.call;
    if (call?.peer && call.phase !== 'ended') return call.peer.stats();
    return (call ?? app.lastEnded)?.finalStats ?? null;
  },
  remoteAudioHz: (ms) => {
    const stream = $('remote').srcObject;
    return stream && stream.getAudioTracks().length ? dominantFrequency(new MediaStream(stream.getAudioTracks()), ms) : null;
  },
};

wire();
app.devicesReady = startDevices();
showLobby();
