// Drives Debian's firefox-esr (headless, fake camera and microphone) through the Duet web
// client, with puppeteer-core over WebDriver BiDi; for the mixed scenarios Debian's
// chromium too (playwright-core, as in duet.mjs). tests/firefox.rs runs one scenario per
// call:
//
//   node firefox.mjs SCENARIO '{"base":"http://localhost:PORT", ...}'
//
// and reads the single JSON line it prints on stdout. Progress and the pages' console go
// to stderr. Firefox here has no H.264 (its OpenH264 plugin is downloaded at first use),
// so these calls run on VP8. Pages are opened on http://localhost: a secure context, which
// Firefox needs for the camera.

import puppeteer from 'puppeteer-core';
import { chromium } from 'playwright-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join as joinPath } from 'node:path';

const [scenario, rawArgs] = process.argv.slice(2);
const args = JSON.parse(rawArgs ?? '{}');
const log = (...a) => console.error(`[${scenario}]`, ...a);

const FIREFOX = process.env.DUET_FIREFOX ?? '/usr/bin/firefox-esr';
const CHROMIUM = process.env.DUET_CHROMIUM ?? '/usr/bin/chromium';
const WINDOW_MS = args.window_ms ?? 8000;
const CONNECT_MS = 60000;

async function launchFirefox() {
  const browser = await puppeteer.launch({
    browser: 'firefox',
    executablePath: FIREFOX,
    headless: true,
    extraPrefsFirefox: {
      'media.navigator.streams.fake': true,
      'media.navigator.permission.disabled': true,
      // Real host addresses, not mDNS names (the native client resolves none).
      'media.peerconnection.ice.obfuscate_host_addresses': false,
      // Loopback pairs allowed (as Chromium's --allow-loopback-in-peer-connection) when
      // the native client offers: it gathers 127.0.0.1 too and, controlling ICE, can
      // nominate a loopback pair, which Firefox otherwise never takes (it stayed
      // connecting in 4 of 5 runs). Only then: with it on while Firefox offers, Firefox
      // may move the call to another pair mid-call, and the sender's estimate restarts.
      'media.peerconnection.ice.loopback': Boolean(args.loopback),
      'media.autoplay.default': 0,
      'media.autoplay.blocking_policy': 0,
    },
  });
  return { browser, close: () => browser.close().catch(() => {}) };
}

async function launchChromium() {
  const profile = mkdtempSync(joinPath(tmpdir(), 'duet-chromium-'));
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      '--use-fake-device-for-media-stream=fps=30', '--use-fake-ui-for-media-stream',
      // No --allow-loopback-in-peer-connection here (Chromium is only Firefox's peer):
      // with it Chromium gathers 127.0.0.1 and, controlling ICE, can nominate that
      // pair, which Firefox (loopback off) never takes: the call stayed connecting.
      '--autoplay-policy=no-user-gesture-required',
      `--disk-cache-dir=${joinPath(profile, 'cache')}`,
    ],
  });
  return {
    browser,
    close: async () => {
      await browser.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** The same few page operations over puppeteer (Firefox) and playwright (Chromium). */
async function openFirefoxPage(browser, url, who) {
  const page = await browser.newPage();
  page.on('console', (m) => console.error(`  ${who} console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.error(`  ${who} page error: ${e.message}`));
  await page.setViewport({ width: 1280, height: 800 });
  await page.goto(url);
  await page.waitForFunction(() => window.duet !== undefined);
  return {
    who,
    evaluate: (fn, arg) => page.evaluate(fn, arg),
    fill: async (selector, text) => {
      await page.$eval(selector, (e) => { e.value = ''; });
      await page.type(selector, text);
    },
    click: (selector) => page.click(selector),
    text: (selector) => page.$eval(selector, (e) => e.textContent),
    press: (selector, key) => page.focus(selector).then(() => page.keyboard.press(key)),
    screenshot: (path) => page.screenshot({ path }),
  };
}

async function openChromiumPage(browser, url, who) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  await context.grantPermissions(['camera', 'microphone']);
  const page = await context.newPage();
  page.on('console', (m) => console.error(`  ${who} console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => console.error(`  ${who} page error: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.duet !== undefined);
  return {
    who,
    evaluate: (fn, arg) => page.evaluate(fn, arg),
    fill: (selector, text) => page.fill(selector, text),
    click: (selector) => page.click(selector),
    text: (selector) => page.textContent(selector),
    press: (selector, key) => page.press(selector, key),
    screenshot: (path) => page.screenshot({ path }),
  };
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
  try {
    await until(`${page.who}: phase ${phases.join('/')}`, async () => phases.includes(await phase(page)), ms);
  } catch (e) {
    // What the page shows and its connection's statistics, for the failure message.
    const line = await stateLine(page).catch(() => '?');
    const s = await stats(page).catch(() => null);
    throw new Error(`${e.message} (state line: ${line}; stats: ${JSON.stringify(s)})`);
  }
  return stateLine(page);
}

async function join(page, name) {
  await page.fill('#name', name);
  await page.click('#join');
}

/** Connected, and the remote video decoding. */
async function waitMedia(page) {
  await waitPhase(page, 'connected');
  await until(`${page.who}: decoded remote video`, async () => ((await stats(page))?.video_in?.frames_decoded ?? 0) > 5);
}

/** Frames decoded and sent by each page over the same window, and the codecs. */
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
    codec_in: after[i].video_in.codec,
    codec_out: after[i].video_out?.codec ?? null,
    stats: after[i],
  }));
}

async function sendChat(page, text) {
  await until('chat input enabled', () => page.evaluate(() => !document.querySelector('#chat-input')?.disabled));
  await page.fill('#chat-input', text);
  await page.press('#chat-input', 'Enter');
  await until(`chat line "${text}" shown as sent`, () =>
    page.evaluate((t) => window.duet.chat().some((l) => l.mine && l.text === t), text));
}

async function waitChat(page, text) {
  await until(`chat line "${text}" received`, () =>
    page.evaluate((t) => window.duet.chat().some((l) => !l.mine && l.text === t), text));
}

// ------------------------------------------------------------------ scenarios

/** Firefox against a native headless client in `args.room`. */
async function native(launched) {
  const { firefox } = launched;
  const page = await openFirefoxPage(firefox, `${args.base}/r/${args.room}`, 'firefox');
  await join(page, 'Firefox');
  await waitMedia(page);
  const [window] = await measure([page]);
  await sendChat(page, args.chat_out);
  await waitChat(page, args.chat_in);
  if (args.screenshot) await page.screenshot(args.screenshot);
  if (args.hang_up === 'browser') await page.click('#hang-up');
  const ended = await waitPhase(page, 'ended', 90000);
  return { window, ended };
}

/** Firefox and Chromium in one room; `args.first` joins first (and so offers). */
async function mixed(launched) {
  const url = `${args.base}/r/${args.room}`;
  const open = {
    firefox: () => openFirefoxPage(launched.firefox, url, 'firefox'),
    chromium: () => openChromiumPage(launched.chromium, url, 'chromium'),
  };
  const second = args.first === 'firefox' ? 'chromium' : 'firefox';
  const a = await open[args.first]();
  await join(a, args.first);
  await waitPhase(a, 'waiting');
  const b = await open[second]();
  await join(b, second);
  await Promise.all([waitMedia(a), waitMedia(b)]);
  const [wa, wb] = await measure([a, b]);
  await b.click('#hang-up');
  const [endedA, endedB] = await Promise.all([waitPhase(a, 'ended'), waitPhase(b, 'ended')]);
  return { [args.first]: wa, [second]: wb, ended_first: endedA, ended_second: endedB };
}

const scenarios = { native, mixed };

async function main() {
  const run = scenarios[scenario];
  if (!run) throw new Error(`unknown scenario ${scenario}`);
  const launched = {};
  const closers = [];
  try {
    const ff = await launchFirefox();
    closers.push(ff.close);
    launched.firefox = ff.browser;
    if (scenario === 'mixed') {
      const ch = await launchChromium();
      closers.push(ch.close);
      launched.chromium = ch.browser;
    }
    log('browsers up');
    return await run(launched);
  } finally {
    for (const close of closers) await close();
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
