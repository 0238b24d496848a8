// Camera and microphone: opening them, listing them, the level meter, and the codec
// order the call asks for (H.264 Constrained Baseline first: what the desktop app sends
// and decodes; Opus for audio).

/** Opens camera and microphone (the chosen ones when ids are given). */
export async function openDevices(cameraId, micId) {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error('this page is not in a secure context (https or localhost), so the browser offers no camera or microphone');
  }
  const video = cameraId ? { deviceId: { exact: cameraId } } : true;
  const audio = micId
    ? { deviceId: { exact: micId }, echoCancellation: true, noiseSuppression: true }
    : { echoCancellation: true, noiseSuppression: true };
  const constraints = { video: { ...(video === true ? {} : video), width: { ideal: 640 }, height: { ideal: 480 } }, audio };
  try {
    return await navigator.mediaDevices.getUserMedia(constraints);
  } catch (e) {
    // No camera (or it is busy): a call with the microphone only.
    console.warn('camera and microphone together failed; trying the microphone alone', e);
    try {
      return await navigator.mediaDevices.getUserMedia({ audio });
    } catch {
      throw new Error(`${e.name}: ${e.message}`);
    }
  }
}

/** Fills a <select> with the devices of one kind, keeping `selected`. */
export async function listDevices(select, kind, selected) {
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === kind);
  select.replaceChildren();
  devices.forEach((d, i) => {
    const option = document.createElement('option');
    option.value = d.deviceId;
    option.textContent = d.label || `${kind === 'videoinput' ? 'Camera' : 'Microphone'} ${i + 1}`;
    if (d.deviceId === selected) option.selected = true;
    select.append(option);
  });
  select.disabled = devices.length === 0;
}

/** Drives a <meter> with the microphone's level until `stop()` is called. */
export function levelMeter(stream, meter) {
  const track = stream.getAudioTracks()[0];
  if (!track) return { stop() {} };
  const context = new AudioContext();
  const source = context.createMediaStreamSource(new MediaStream([track]));
  const analyser = context.createAnalyser();
  analyser.fftSize = 1024;
  source.connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  let running = true;
  const tick = () => {
    if (!running) return;
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    const rms = Math.sqrt(sum / samples.length);
    // dBFS from -60 (silence) to 0, shown as 0..1.
    const db = 20 * Math.log10(Math.max(rms, 1e-6));
    meter.value = Math.min(1, Math.max(0, (db + 60) / 60));
    requestAnimationFrame(tick);
  };
  context.resume().catch(() => {});
  tick();
  return {
    stop() {
      running = false;
      context.close().catch(() => {});
    },
  };
}

/**
 * The strongest frequency (Hz) in a stream's audio, measured over `ms`: shows that
 * received audio is real sound and not silence.
 */
export async function dominantFrequency(stream, ms = 1000) {
  const context = new AudioContext();
  await context.resume().catch(() => {});
  const source = context.createMediaStreamSource(stream);
  const analyser = context.createAnalyser();
  analyser.fftSize = 8192;
  source.connect(analyser);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const sum = new Float32Array(analyser.frequencyBinCount);
  const end = performance.now() + ms;
  while (performance.now() < end) {
    await new Promise((r) => setTimeout(r, 50));
    analyser.getFloatFrequencyData(bins);
    for (let i = 0; i < bins.length; i++) sum[i] += Math.pow(10, bins[i] / 10);
  }
  let best = 1;
  for (let i = 2; i < sum.length; i++) if (sum[i] > sum[best]) best = i;
  await context.close().catch(() => {});
  return (best * context.sampleRate) / analyser.fftSize;
}

function isBaselineH264(codec) {
  const f = codec.sdpFmtpLine ?? '';
  return codec.mimeType.toLowerCase() === 'video/h264' &&
    /profile-level-id=42e01f/i.test(f) && /packetization-mode=1/.test(f);
}

/** Video codecs in the order we want them: H.264 42e01f mode 1, other H.264, the rest. */
export function videoCodecOrder() {
  const caps = RTCRtpReceiver.getCapabilities('video');
  if (!caps) return null;
  const rank = (c) => {
    if (isBaselineH264(c)) return 0;
    if (c.mimeType.toLowerCase() === 'video/h264') return 1;
    return 2;
  };
  return [...caps.codecs].sort((a, b) => rank(a) - rank(b));
}

export function audioCodecOrder() {
  const caps = RTCRtpReceiver.getCapabilities('audio');
  if (!caps) return null;
  const rank = (c) => (c.mimeType.toLowerCase() === 'audio/opus' ? 0 : 1);
  return [...caps.codecs].sort((a, b) => rank(a) - rank(b));
}

/** Applies our codec order to a transceiver (browsers without the API keep theirs). */
export function preferCodecs(transceiver, kind) {
  if (typeof transceiver.setCodecPreferences !== 'function') return;
  const order = kind === 'video' ? videoCodecOrder() : audioCodecOrder();
  if (!order || order.length === 0) return;
  try {
    transceiver.setCodecPreferences(order);
  } catch (e) {
    console.warn('setCodecPreferences', e);
  }
}
