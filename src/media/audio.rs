//! Audio: 48 kHz mono 16-bit PCM in 20 ms frames, sources (sine, WAV file), Opus
//! encoding/decoding with FEC and loss concealment, and sinks
//! (WAV file, null).

use rubato::Resampler as _;
use std::path::{Path, PathBuf};

use super::MediaError;

pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;

/// Something that produces 20 ms frames of 48 kHz mono audio.
pub trait AudioSource: Send {
    /// The next [`FRAME_SAMPLES`] samples. Synthetic sources return at once; the caller
    /// paces them.
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError>;
    fn describe(&self) -> String;
}

/// A pure tone.
#[derive(Debug, Clone)]
pub struct Sine {
    frequency: f64,
    amplitude: f64,
    phase: f64,
}

impl Sine {
    pub fn new(frequency: f64) -> Sine {
        Sine {
            frequency,
            amplitude: 0.3 * f64::from(i16::MAX),
            phase: 0.0,
        }
    }
}

impl AudioSource for Sine {
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError> {
        let step = std::f64::consts::TAU * self.frequency / f64::from(SAMPLE_RATE);
        let frame = (0..FRAME_SAMPLES)
            .map(|_| {
                let s = (self.phase.sin() * self.amplitude) as i16;
                self.phase = (self.phase + step) % std::f64::consts::TAU;
                s
            })
            .collect();
        Ok(frame)
    }

    fn describe(&self) -> String {
        format!("sine {} Hz", self.frequency)
    }
}

/// Silence.
#[derive(Debug, Clone, Default)]
pub struct Silence;

impl AudioSource for Silence {
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError> {
        Ok(vec![0; FRAME_SAMPLES])
    }

    fn describe(&self) -> String {
        "silence".into()
    }
}

/// A WAV file (any rate, any channel count, 8-32 bit integer or float), mixed to mono,
/// resampled to 48 kHz, looping.
#[derive(Debug, Clone)]
pub struct WavFile {
    path: PathBuf,
    samples: Vec<i16>,
    position: usize,
}

impl WavFile {
    pub fn open(path: &Path) -> Result<WavFile, MediaError> {
        let reader = hound::WavReader::open(path)
            .map_err(|e| MediaError::Io(format!("{}: {e}", path.display())))?;
        WavFile::read(reader, path)
    }

    /// A WAV held in memory (e.g. a sound from `assets/` built into the binary).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<WavFile, MediaError> {
        let reader = hound::WavReader::new(std::io::Cursor::new(bytes))
            .map_err(|e| MediaError::Format(format!("{name}: {e}")))?;
        WavFile::read(reader, Path::new(name))
    }

    fn read<R: std::io::Read>(
        reader: hound::WavReader<R>,
        path: &Path,
    ) -> Result<WavFile, MediaError> {
        let spec = reader.spec();
        let channels = usize::from(spec.channels.max(1));
        let raw: Vec<f32> = match spec.sample_format {
            hound::SampleFormat::Float => reader
                .into_samples::<f32>()
                .collect::<Result<_, _>>()
                .map_err(|e| MediaError::Format(e.to_string()))?,
            hound::SampleFormat::Int => {
                let scale = 1.0 / (1u64 << (spec.bits_per_sample.max(1) - 1)) as f32;
                reader
                    .into_samples::<i32>()
                    .map(|s| s.map(|v| v as f32 * scale))
                    .collect::<Result<_, _>>()
                    .map_err(|e| MediaError::Format(e.to_string()))?
            }
        };
        let mono: Vec<f32> = raw
            .chunks(channels)
            .map(|c| c.iter().sum::<f32>() / c.len() as f32)
            .collect();
        let samples = resample(&mono, spec.sample_rate, SAMPLE_RATE)?
            .into_iter()
            .map(|v| (v.clamp(-1.0, 1.0) * f32::from(i16::MAX)) as i16)
            .collect::<Vec<_>>();
        if samples.is_empty() {
            return Err(MediaError::Format(format!(
                "{}: no samples",
                path.display()
            )));
        }
        Ok(WavFile {
            path: path.to_owned(),
            samples,
            position: 0,
        })
    }
}

impl AudioSource for WavFile {
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError> {
        let mut frame = Vec::with_capacity(FRAME_SAMPLES);
        while frame.len() < FRAME_SAMPLES {
            let take = (FRAME_SAMPLES - frame.len()).min(self.samples.len() - self.position);
            frame.extend_from_slice(&self.samples[self.position..self.position + take]);
            self.position = (self.position + take) % self.samples.len();
        }
        Ok(frame)
    }

    fn describe(&self) -> String {
        format!("WAV file {}", self.path.display())
    }
}

/// Resampling a stream that arrives in pieces of any length (a device's callbacks), its
/// phase kept across pieces: rubato's FFT resampler (band-limited: no aliasing, no
/// drift) in 10 ms chunks. It replaced a linear interpolation per piece, which aliased
/// and, rounding each piece's length down, lost samples: at 44.1 kHz with 1,024-sample
/// callbacks about 25 a second, which the echo canceller saw as clock drift.
pub struct Resampler {
    /// None when the rates are equal (samples pass through).
    inner: Option<rubato::FftFixedIn<f32>>,
    /// Input waiting for a whole chunk.
    pending: Vec<f32>,
}

impl Resampler {
    /// From `from` to `to` samples per second (mono).
    pub fn new(from: u32, to: u32) -> Result<Resampler, MediaError> {
        if from == to {
            return Ok(Resampler {
                inner: None,
                pending: Vec::new(),
            });
        }
        // 10 ms chunks of input: the delay it adds, and small FFTs.
        let chunk = (from as usize / 100).max(1);
        let inner = rubato::FftFixedIn::new(from as usize, to as usize, chunk, 1, 1)
            .map_err(|e| MediaError::Format(format!("resampling {from} -> {to} Hz: {e}")))?;
        Ok(Resampler {
            inner: Some(inner),
            pending: Vec::new(),
        })
    }

    /// Resamples `input` (any length), appending what is ready to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        let Some(inner) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            return;
        };
        self.pending.extend_from_slice(input);
        let mut start = 0;
        while self.pending.len() - start >= inner.input_frames_next() {
            let need = inner.input_frames_next();
            match inner.process(&[&self.pending[start..start + need]], None) {
                Ok(chunk) => out.extend(chunk.into_iter().flatten()),
                Err(e) => tracing::warn!(error = %e, "resampling"),
            }
            start += need;
        }
        self.pending.drain(..start);
    }

    /// Resamples the rest, padded with silence to a whole chunk (a file's end).
    pub fn flush(&mut self, out: &mut Vec<f32>) {
        let Some(need) = self.inner.as_ref().map(|i| i.input_frames_next()) else {
            return;
        };
        if !self.pending.is_empty() {
            let silence = vec![0.0; need - self.pending.len() % need];
            self.push(&silence, out);
        }
    }
}

/// Resamples a whole signal at once (a file): [`Resampler`] with its end flushed.
pub fn resample(input: &[f32], from: u32, to: u32) -> Result<Vec<f32>, MediaError> {
    let mut resampler = Resampler::new(from, to)?;
    let mut out = Vec::with_capacity(input.len() * to as usize / from.max(1) as usize + 1);
    resampler.push(input, &mut out);
    resampler.flush(&mut out);
    Ok(out)
}

/// Opus encoder: 48 kHz mono, 20 ms frames, VoIP mode, in-band FEC on.
pub struct OpusEncoder {
    inner: opus::Encoder,
    out: Vec<u8>,
}

impl OpusEncoder {
    pub fn new(bitrate_bps: i32) -> Result<OpusEncoder, MediaError> {
        let err = |e: opus::Error| MediaError::Codec(format!("opus encoder: {e}"));
        let mut inner =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)
                .map_err(err)?;
        inner
            .set_bitrate(opus::Bitrate::Bits(bitrate_bps))
            .map_err(err)?;
        inner.set_inband_fec(true).map_err(err)?;
        inner.set_packet_loss_perc(10).map_err(err)?;
        Ok(OpusEncoder {
            inner,
            out: vec![0; 4000],
        })
    }

    /// Tells the encoder how much loss to expect (percent): in-band FEC spends bits on
    /// repairing a lost packet from the next in proportion.
    pub fn set_expected_loss(&mut self, percent: u8) -> Result<(), MediaError> {
        self.inner
            .set_packet_loss_perc(i32::from(percent.min(100)))
            .map_err(|e| MediaError::Codec(format!("opus encoder: {e}")))
    }

    /// Encodes one 20 ms frame.
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Vec<u8>, MediaError> {
        let n = self
            .inner
            .encode(pcm, &mut self.out)
            .map_err(|e| MediaError::Codec(format!("opus encode: {e}")))?;
        Ok(self.out[..n].to_vec())
    }
}

/// Opus decoder with loss handling.
pub struct OpusDecoder {
    inner: opus::Decoder,
}

impl OpusDecoder {
    pub fn new() -> Result<OpusDecoder, MediaError> {
        let inner = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)
            .map_err(|e| MediaError::Codec(format!("opus decoder: {e}")))?;
        Ok(OpusDecoder { inner })
    }

    /// Decodes a packet (`Some`) or conceals a lost one (`None`). With `fec`, the packet
    /// is the one *after* the loss and its redundancy rebuilds the lost frame.
    pub fn decode(&mut self, packet: Option<&[u8]>, fec: bool) -> Result<Vec<i16>, MediaError> {
        let mut pcm = vec![0i16; FRAME_SAMPLES * 6]; // up to 120 ms
        let n = self
            .inner
            .decode(packet.unwrap_or(&[]), &mut pcm[..FRAME_SAMPLES], fec)
            .or_else(|_| self.inner.decode(packet.unwrap_or(&[]), &mut pcm, fec))
            .map_err(|e| MediaError::Codec(format!("opus decode: {e}")))?;
        pcm.truncate(n);
        Ok(pcm)
    }
}

/// Where decoded audio goes.
pub trait AudioSink: Send {
    fn write(&mut self, pcm: &[i16]) -> Result<(), MediaError>;
    fn describe(&self) -> String;
}

/// Discards audio (but it was decoded).
#[derive(Debug, Default)]
pub struct NullSink;

impl AudioSink for NullSink {
    fn write(&mut self, _pcm: &[i16]) -> Result<(), MediaError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "null".into()
    }
}

/// Writes a 48 kHz mono 16-bit WAV file.
pub struct WavSink {
    path: PathBuf,
    writer: Option<hound::WavWriter<std::io::BufWriter<std::fs::File>>>,
}

impl WavSink {
    pub fn create(path: &Path) -> Result<WavSink, MediaError> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let writer = hound::WavWriter::create(path, spec)
            .map_err(|e| MediaError::Io(format!("{}: {e}", path.display())))?;
        Ok(WavSink {
            path: path.to_owned(),
            writer: Some(writer),
        })
    }

    /// Finishes the header; also done on drop.
    pub fn finish(&mut self) -> Result<(), MediaError> {
        if let Some(w) = self.writer.take() {
            w.finalize().map_err(|e| MediaError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

impl AudioSink for WavSink {
    fn write(&mut self, pcm: &[i16]) -> Result<(), MediaError> {
        if let Some(w) = self.writer.as_mut() {
            for &s in pcm {
                w.write_sample(s)
                    .map_err(|e| MediaError::Io(e.to_string()))?;
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("WAV file {}", self.path.display())
    }
}

impl Drop for WavSink {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// The strongest frequency in `pcm` between 50 and 4000 Hz, to 5 Hz (Goertzel scan).
pub fn dominant_frequency(pcm: &[i16]) -> f64 {
    let n = pcm.len().min(SAMPLE_RATE as usize / 2);
    let x: Vec<f64> = pcm[pcm.len() - n..].iter().map(|&s| f64::from(s)).collect();
    let mut best = (0.0, 0.0);
    let mut f = 50.0;
    while f <= 4000.0 {
        let w = std::f64::consts::TAU * f / f64::from(SAMPLE_RATE);
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in &x {
            let s = v + coeff * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
        if power > best.1 {
            best = (f, power);
        }
        f += 5.0;
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opus_round_trip_keeps_the_tone() {
        let mut sine = Sine::new(440.0);
        let mut enc = OpusEncoder::new(32_000).unwrap();
        let mut dec = OpusDecoder::new().unwrap();
        let mut out = Vec::new();
        for _ in 0..50 {
            let packet = enc.encode(&sine.next_frame().unwrap()).unwrap();
            assert!(packet.len() < 200);
            out.extend(dec.decode(Some(&packet), false).unwrap());
        }
        assert_eq!(out.len(), 50 * FRAME_SAMPLES);
        assert!((dominant_frequency(&out) - 440.0).abs() <= 5.0);
        // Concealment yields a full frame too.
        assert_eq!(dec.decode(None, false).unwrap().len(), FRAME_SAMPLES);
    }

    #[test]
    fn a_stream_resampled_in_pieces_keeps_its_tone_its_level_and_its_length() {
        // Ten seconds of 1 kHz at 44.1 kHz, in the uneven pieces a device delivers.
        let input: Vec<f32> = (0..441_000)
            .map(|i| (i as f32 * std::f32::consts::TAU * 1000.0 / 44_100.0).sin() * 0.5)
            .collect();
        let mut r = Resampler::new(44_100, 48_000).unwrap();
        let mut out = Vec::new();
        for piece in input.chunks(1024) {
            r.push(piece, &mut out);
        }
        // No samples lost to rounding: 480,000 less at most the one chunk still pending.
        assert!((479_520..=480_000).contains(&out.len()), "{}", out.len());
        let pcm: Vec<i16> = out.iter().map(|v| (v * 32767.0) as i16).collect();
        assert!((dominant_frequency(&pcm[4800..]) - 1000.0).abs() <= 2.0);
        let peak = out[4800..].iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!((peak - 0.5).abs() < 0.01, "peak {peak}");
        // The same signal in other pieces comes out the same.
        let mut again = Resampler::new(44_100, 48_000).unwrap();
        let mut out2 = Vec::new();
        for piece in input.chunks(333) {
            again.push(piece, &mut out2);
        }
        let n = out.len().min(out2.len());
        assert!(
            out[..n]
                .iter()
                .zip(&out2[..n])
                .all(|(a, b)| (a - b).abs() < 1e-4)
        );
        // Equal rates pass through; a file's end is flushed.
        assert_eq!(
            resample(&[0.25; 10], 48_000, 48_000).unwrap(),
            vec![0.25; 10]
        );
        assert_eq!(resample(&input[..441], 44_100, 48_000).unwrap().len(), 480);
    }

    #[test]
    fn wav_file_is_mixed_resampled_and_looped() {
        let dir = std::env::temp_dir().join(format!("duet-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tone.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 16_000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        for i in 0..16_000 {
            let s =
                ((i as f64 * std::f64::consts::TAU * 1000.0 / 16_000.0).sin() * 10_000.0) as i16;
            w.write_sample(s).unwrap();
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        let mut src = WavFile::open(&path).unwrap();
        let mut pcm = Vec::new();
        for _ in 0..60 {
            pcm.extend(src.next_frame().unwrap()); // 1.2 s: loops once
        }
        assert!((dominant_frequency(&pcm) - 1000.0).abs() <= 5.0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
