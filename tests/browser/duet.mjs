// Drives Debian's chromium (headless, fake camera and microphone) through the Duet web
// client served by a real signaling server. tests/browser.rs runs one scenario per call:
//
//   node duet.mjs SCENARIO '{"base":"http://127.0.0.1:PORT", ...}'
//
// and reads the single JSON line it prints on stdout. Progress and the pages' console go
// to stderr. Every wait is for a condition, with a generous deadline; the only timed
// stretch is the measurement window, over which frames are counted.

import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join as joinPath } from 'node:path';

const [scenario, rawArgs] = process.argv.slice(2);
const args = JSON.parse(rawArgs ?? '{}');
const log = (...a) => console.error(`[${scenario}]`, ...a);

const CHROMIUM = process.env.DUET_CHROMIUM ?? '/usr/bin/chromium';
const WINDOW_MS = args.window_ms ?? 8000;
const CONNECT_MS = 60000;

async function launch() {
  // A fresh profile per run (playwright's launch() makes one too; this one we delete).
  const profile = mkdtempSync(joinPath(tmpdir(), 'duet-chromium-'));
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream=fps=30', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
      `--disk-cache-dir=${joinPath(profile, 'cache')}`,
      ...(args.chromium_flags ?? []),
    ],
  });
  return { browser, cleanup: () => rmSync(profile, { recursive: true, force: true }) };
}

async function openPage(browser, url, who, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('console', (m) => console.error(`  ${who} console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.error(`  ${who} page error: ${e.message}`));
  // In a fresh network namespace the first navigation can die of ERR_NETWORK_CHANGED
  // (the interfaces settle: IPv6 link-local addresses leave their tentative state).
  for (let attempt = 1; ; attempt++) {
    try {
      await page.goto(url);
      break;
    } catch (e) {
      if (attempt >= 5 || !String(e).includes('ERR_NETWORK_CHANGED')) throw e;
      console.error(`  ${who}: ${url}: network changed, again`);
      await new Promise((r) => setTimeout(r, 500));
    }
  }
  await page.waitForFunction(() => window.duet !== undefined);
  return page;
}

/** Polls `check` (async) until it returns something truthy; fails with `what` after `ms`. */
async function until(what, check, ms = CONNECT_MS) {
  const end = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const phase = (page) => page.evaluate(() => window.duet.phase());
const stateLine = (page) => page.evaluate(() => window.duet.stateLine());
const stats = (page) => page.evaluate(() => window.duet.stats());

async function waitPhase(page, wanted, ms = CONNECT_MS) {
  const phases = Array.isArray(wanted) ? wanted : [wanted];
  await until(`phase ${phases.join('/')}`, async () => phases.includes(await phase(page)), ms);
  return stateLine(page);
}

async function join(page, name) {
  await page.fill('#name', name);
  await page.click('#join');
}

/** Connected, and the remote video decoding. */
async function waitMedia(page) {
  await waitPhase(page, 'connected');
  await until('decoded remote video', async () => ((await stats(page))?.video_in?.frames_decoded ?? 0) > 5);
}

/** Frames decoded and sent by each page over the same window. */
async function measure(pages) {
  const before = await Promise.all(pages.map(stats));
  const t0 = Date.now();
  const hz = pages.map((p) => p.evaluate((ms) => window.duet.remoteAudioHz(ms), Math.min(2000, WINDOW_MS)));
  await new Promise((r) => setTimeout(r, WINDOW_MS));
  const after = await Promise.all(pages.map(stats));
  const seconds = (Date.now() - t0) / 1000;
  const audioHz = await Promise.all(hz);
  return pages.map((_, i) => ({
    seconds,
    frames_decoded: after[i].video_in.frames_decoded - before[i].video_in.frames_decoded,
    frames_received: after[i].video_in.frames_received - before[i].video_in.frames_received,
    frames_sent: (after[i].video_out?.frames_sent ?? 0) - (before[i].video_out?.frames_sent ?? 0),
    audio_samples: after[i].audio_in.samples - before[i].audio_in.samples,
    audio_concealed: after[i].audio_in.concealed - before[i].audio_in.concealed,
    audio_energy: after[i].audio_in.energy - before[i].audio_in.energy,
    audio_hz: audioHz[i],
    stats: after[i],
  }));
}

async function sendChat(page, text) {
  await page.waitForSelector('#chat-input:not([disabled])', { timeout: CONNECT_MS });
  await page.fill('#chat-input', text);
  await page.press('#chat-input', 'Enter');
  await until(`chat line "${text}" shown as sent`, () =>
    page.evaluate((t) => window.duet.chat().some((l) => l.mine && l.text === t), text));
}

async function waitChat(page, text) {
  await until(`chat line "${text}" received`, () =>
    page.evaluate((t) => window.duet.chat().some((l) => !l.mine && l.text === t), text));
}

async function screenshot(page, path) {
  if (path) await page.screenshot({ path });
}

async function createMeeting(body) {
  const response = await fetch(`${args.base}/api/rooms`, { method: 'POST', body: JSON.stringify(body) });
  if (response.status !== 201) throw new Error(`POST /api/rooms: ${response.status} ${await response.text()}`);
  return response.json();
}

// ------------------------------------------------------------------ scenarios

/** One browser page against a native headless client in `args.room`. */
async function nativeCall(browser) {
  const page = await openPage(browser, `${args.base}/r/${args.room}`, 'web');
  await join(page, 'Web');
  await waitMedia(page);
  const [window] = await measure([page]);
  await sendChat(page, args.chat_out);
  await waitChat(page, args.chat_in);
  await page.click('#stats-toggle');
  await until('bitrates in the stats panel', async () => (await page.textContent('#stats')).includes('kbit/s'));
  await screenshot(page, args.screenshot);
  if (args.hang_up === 'browser') await page.click('#hang-up');
  const ended = await waitPhase(page, 'ended', 90000);
  return { window, ended, final: await stats(page), codec_in: window.stats.video_in.codec, codec_out: window.stats.video_out?.codec };
}

/** A native client rang from the browser by name (`args.callee`, signed in natively). */
async function nativeDirect(browser) {
  const page = await openPage(browser, `${args.base}/`, 'web');
  await page.fill('#name', args.caller);
  await page.click('#sign-in');
  await until('signed in', () => page.evaluate(() => window.duet.signedIn()));
  await page.fill('#callee', args.callee);
  await page.click('#dial');
  await waitMedia(page);
  const [window] = await measure([page]);
  await sendChat(page, args.chat_out);
  await waitChat(page, args.chat_in);
  await page.click('#hang-up');
  const ended = await waitPhase(page, 'ended');
  return { window, ended, final: await stats(page) };
}

/** Two browsers in a room; a third is refused; one hangs up. */
async function pair(browser) {
  const url = `${args.base}/r/${args.room}`;
  const a = await openPage(browser, url, 'ann');
  await join(a, 'Ann');
  const waiting = await waitPhase(a, 'waiting');
  // Bob is on a phone-sized screen.
  const b = await openPage(browser, url, 'bob', { width: 390, height: 844 });
  await join(b, 'Bob');
  await Promise.all([waitMedia(a), waitMedia(b)]);
  const [wa, wb] = await measure([a, b]);
  await sendChat(a, 'hello Bob');
  await sendChat(b, 'hello Ann');
  await Promise.all([waitChat(b, 'hello Bob'), waitChat(a, 'hello Ann')]);

  // Bob's WebSocket drops: he takes his seat back with `resume`; Ann is told meanwhile.
  await b.evaluate(() => window.duet.dropSignaling());
  const annNotice = await until('Ann told that Bob is reconnecting', async () => {
    const t = await a.textContent('#notice');
    return t.includes('reconnecting') ? t : null;
  });
  await until('Bob resumed', () => b.evaluate(() => window.duet.resumes() >= 1));
  const bobAfterResume = await waitPhase(b, 'connected');

  const c = await openPage(browser, url, 'cid');
  await join(c, 'Cid');
  const full = await waitPhase(c, 'ended');

  await screenshot(a, args.screenshot);
  await screenshot(b, args.screenshot_phone);
  await b.click('#hang-up');
  const [endedA, endedB] = await Promise.all([waitPhase(a, 'ended'), waitPhase(b, 'ended')]);
  return {
    waiting, ann: wa, bob: wb, room_full: full, ended_ann: endedA, ended_bob: endedB,
    ann_notice: annNotice, bob_after_resume: bobAfterResume,
    codec_ann_in: wa.stats.video_in.codec, codec_bob_in: wb.stats.video_in.codec,
  };
}

/** A meeting: the host ends it; a meeting that has not started refuses with its time. */
async function meeting(browser) {
  const m = await createMeeting({ title: 'Browser test meeting' });
  const host = await openPage(browser, `${args.base}/r/${m.room_id}#host=${m.host_token}`, 'host');
  const title = await host.textContent('#room-title');
  await join(host, 'Hana');
  await waitPhase(host, 'waiting');
  const guest = await openPage(browser, `${args.base}/r/${m.room_id}`, 'guest');
  await join(guest, 'Gus');
  await Promise.all([waitMedia(host), waitMedia(guest)]);
  const hostFlags = {
    host: await host.evaluate(() => window.duet.host()),
    guest: await guest.evaluate(() => window.duet.host()),
    end_button_host: await host.isVisible('#end-meeting'),
    end_button_guest: await guest.isVisible('#end-meeting'),
  };
  await host.click('#end-meeting');
  const [endedHost, endedGuest] = await Promise.all([waitPhase(host, 'ended'), waitPhase(guest, 'ended')]);
  const after = await fetch(`${args.base}/api/rooms/${m.room_id}`).then((r) => r.json());

  const startsAt = new Date(Date.now() + 2 * 3600 * 1000);
  startsAt.setUTCSeconds(0, 0);
  const later = await createMeeting({ starts_at: startsAt.toISOString() });
  const early = await openPage(browser, `${args.base}/r/${later.room_id}`, 'early');
  const lobbyInfo = await until('room info', async () => {
    const t = await early.textContent('#room-info');
    return t.includes('opens') ? t : null;
  });
  await join(early, 'Eve');
  const notStarted = await waitPhase(early, 'ended');
  const localStart = await early.evaluate((iso) => new Date(iso).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }), later.starts_at);
  return {
    title, host_flags: hostFlags, ended_host: endedHost, ended_guest: endedGuest, state_after: after.state,
    not_started: notStarted, lobby_info: lobbyInfo, local_start: localStart,
  };
}

/** Direct call between two browsers: ring and decline, ring and accept, hang up. */
async function directPair(browser) {
  const a = await openPage(browser, `${args.base}/`, 'caller');
  const b = await openPage(browser, `${args.base}/`, 'callee');
  for (const [page, name] of [[a, args.caller], [b, args.callee]]) {
    await page.fill('#name', name);
    await page.click('#sign-in');
    await until(`${name} signed in`, () => page.evaluate(() => window.duet.signedIn()));
  }
  const dial = async () => {
    await a.fill('#callee', args.callee);
    await a.click('#dial');
    await until('the incoming call', () => b.evaluate(() => window.duet.incoming()));
  };
  await dial();
  const ringing = await until('the ring sound', () => b.evaluate(() => window.duet.ringing()));
  const incomingText = await b.textContent('#incoming-text');
  const callerLine = await stateLine(a);
  await b.click('#decline');
  const declined = await waitPhase(a, 'ended');
  const ringStopped = !(await b.evaluate(() => window.duet.ringing()));
  await a.click('#back');

  await dial();
  await b.click('#accept');
  await Promise.all([waitMedia(a), waitMedia(b)]);
  const [wa, wb] = await measure([a, b]);
  await sendChat(b, 'hi caller');
  await waitChat(a, 'hi caller');
  await a.click('#hang-up');
  const endedCallee = await waitPhase(b, 'ended');
  return {
    ringing, incoming_text: incomingText, caller_line: callerLine, declined, ring_stopped: ringStopped,
    caller: wa, callee: wb, ended_callee: endedCallee,
  };
}

/**
 * One peer of a call over an impaired network (benches/browsernet.rs runs it inside a
 * network namespace): joins `args.url` as `args.name`, and once connected samples the
 * stats every second: what it decodes, what it sends and at what target, the bandwidth
 * estimate of the path (`availableOutgoingBitrate`) and the RTT. Hangs up after
 * `args.seconds` when `args.hang_up`, else samples until the other side leaves (at most
 * `args.seconds` + 60). `totals` are the stats at the end, over the whole call.
 */
async function netPeer(browser) {
  const page = await openPage(browser, args.url, args.name);
  await join(page, args.name);
  await waitPhase(page, 'connected', args.wait_ms ?? 90000);
  const t0 = Date.now();
  const samples = [];
  let prev = await stats(page);
  let prevAt = Date.now();
  const limit = args.hang_up ? args.seconds : args.seconds + 60;
  for (let i = 1; i <= limit; i++) {
    await new Promise((r) => setTimeout(r, Math.max(0, t0 + i * 1000 - Date.now())));
    if ((await phase(page)) !== 'connected') break;
    const s = await stats(page);
    const now = Date.now();
    if (!s) break;
    const dt = (now - prevAt) / 1000;
    const kbps = (a, b) => (a !== undefined && b !== undefined ? Math.round(((a - b) * 8) / dt / 1000) : null);
    samples.push({
      t: Math.round((now - t0) / 100) / 10,
      video_kbps_sent: kbps(s.video_out?.bytes, prev?.video_out?.bytes),
      video_kbps_received: kbps(s.video_in?.bytes, prev?.video_in?.bytes),
      target_kbps: s.video_out?.target_bitrate != null ? Math.round(s.video_out.target_bitrate / 1000) : null,
      available_outgoing_kbps: s.available_outgoing_bitrate != null ? Math.round(s.available_outgoing_bitrate / 1000) : null,
      rtt_ms: s.rtt_ms,
      frames_sent: s.video_out?.frames_sent ?? 0,
      frames_decoded: s.video_in?.frames_decoded ?? 0,
      send_size: s.video_out ? `${s.video_out.width}x${s.video_out.height}@${s.video_out.fps ?? 0}` : null,
      quality_limitation: s.video_out?.quality_limitation ?? null,
    });
    prev = s;
    prevAt = now;
  }
  const seconds = (Date.now() - t0) / 1000;
  if (args.hang_up && (await phase(page)) === 'connected') await page.click('#hang-up');
  const ended = await waitPhase(page, 'ended', 90000);
  const totals = await stats(page);
  return { seconds, ended, totals, samples };
}

/**
 * Two peer connections in one page, relay only, through the one TURN URL `args.turn`
 * (`{url, username, credential}`), exchanging a data channel message; what the selected
 * pair's local end says about the relay (`relayProtocol`: udp, tcp or tls).
 */
async function turnRelay(browser) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('console', (m) => console.error(`  page console.${m.type()}: ${m.text()}`));
  await page.goto('about:blank');
  return page.evaluate(async ({ turn, ms }) => {
    const config = {
      iceServers: [{ urls: turn.url, username: turn.username, credential: turn.credential }],
      iceTransportPolicy: 'relay',
    };
    const a = new RTCPeerConnection(config);
    const b = new RTCPeerConnection(config);
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
    const channel = a.createDataChannel('relay');
    const received = new Promise((r) => (b.ondatachannel = (e) => (e.channel.onmessage = (m) => r(m.data))));
    const opened = new Promise((r) => (channel.onopen = r));
    const t0 = performance.now();
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    const deadline = new Promise((_, fail) =>
      setTimeout(() => fail(new Error(`not connected in ${ms} ms: ${a.iceConnectionState}`)), ms));
    await Promise.race([opened, deadline]);
    const connected_ms = Math.round(performance.now() - t0);
    channel.send('through the relay');
    const message = await Promise.race([received, deadline]);
    const report = await a.getStats();
    let local = null;
    report.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) {
        local = report.get(report.get(s.selectedCandidatePairId).localCandidateId);
      }
    });
    a.close();
    b.close();
    return {
      message,
      connected_ms,
      candidate_type: local?.candidateType ?? null,
      relay_protocol: local?.relayProtocol ?? null,
      url: local?.url ?? null,
    };
  }, { turn: args.turn, ms: args.connect_ms ?? 20000 });
}

const scenarios = { netpeer: netPeer, native: nativeCall, 'native-direct': nativeDirect, pair, meeting, 'direct-pair': directPair, 'turn-relay': turnRelay };

async function main() {
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}`);
  const { browser, cleanup } = await launch();
  try {
    return await run(browser);
  } finally {
    await browser.close().catch(() => {});
    cleanup();
  }
}

const hardDeadline = setTimeout(() => {
  console.log(JSON.stringify({ scenario, ok: false, error: 'scenario took over 5 minutes' }));
  process.exit(2);
}, 300000);

main().then(
  (result) => {
    clearTimeout(hardDeadline);
    console.log(JSON.stringify({ scenario, ok: true, ...result }));
  },
  (e) => {
    clearTimeout(hardDeadline);
    console.log(JSON.stringify({ scenario, ok: false, error: String(e && e.stack ? e.stack : e) }));
    process.exitCode = 1;
  },
);
