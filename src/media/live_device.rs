//! The microphone and speaker of a running call: devices that can be changed, and that
//! can go away, without the call noticing more than a warning.
//!
//! - [`LiveMicrophone`] is the call's [`AudioSource`]: when its device is lost (unplugged,
//!   the sound server gone: `media::device` reports it), the default microphone takes
//!   over, and if that is lost too (or cannot be opened), silence is sent. Mute is kept
//!   elsewhere (the call sends silence while muted), so it survives every change.
//! - [`LiveSpeaker`] is the call's speaker [`AudioSink`]: a lost device is replaced by the
//!   default speaker, else received audio is not played. A device is opened on a thread
//!   of its own (opening can take a while, and the sink is written from the network
//!   task); the old one plays until the new one is ready.
//! - [`DeviceSwitch`] is how the call's owner picks another device while the call runs
//!   (the new one takes over at the next frame; the call is not renegotiated), and where
//!   the warnings about lost devices wait to be shown.

use std::sync::{Arc, Mutex, PoisonError};

use super::MediaError;
use super::audio::{AudioSink, AudioSource, FRAME_SAMPLES, Silence};
use super::device::{Microphone, Speaker};

/// Shared between the call's owner and a live device (module docs).
#[derive(Debug, Clone, Default)]
pub struct DeviceSwitch {
    inner: Arc<Mutex<SwitchState>>,
}

#[derive(Debug, Default)]
struct SwitchState {
    /// A device chosen and not taken over yet (`Some(None)`: the default).
    wanted: Option<Option<String>>,
    warnings: Vec<String>,
    /// What is in use now.
    using: Option<String>,
}

impl DeviceSwitch {
    fn state(&self) -> std::sync::MutexGuard<'_, SwitchState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Use the device called `name` (as `media::device::list_audio_devices` lists it;
    /// None: the default) from the next frame on.
    pub fn choose(&self, name: Option<String>) {
        self.state().wanted = Some(name);
    }

    /// What happened to the devices since the last call (lost, replaced, not opened).
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.state().warnings)
    }

    /// The device in use now, as its description.
    pub fn using(&self) -> Option<String> {
        self.state().using.clone()
    }

    fn take_wanted(&self) -> Option<Option<String>> {
        self.state().wanted.take()
    }

    fn warn(&self, warning: String) {
        tracing::warn!("{warning}");
        self.state().warnings.push(warning);
    }

    fn set_using(&self, description: Option<String>) {
        self.state().using = description;
    }
}

/// The call's microphone (module docs).
pub struct LiveMicrophone {
    current: Box<dyn AudioSource>,
    switch: DeviceSwitch,
    /// The default took over after a loss: a second loss means silence.
    on_fallback: bool,
}

impl LiveMicrophone {
    pub fn new(microphone: Box<dyn AudioSource>, switch: DeviceSwitch) -> LiveMicrophone {
        switch.set_using(Some(microphone.describe()));
        LiveMicrophone {
            current: microphone,
            switch,
            on_fallback: false,
        }
    }

    fn replace(&mut self, next: Box<dyn AudioSource>) {
        self.switch.set_using(Some(next.describe()));
        self.current = next;
    }

    /// The device was lost (`error` says how).
    fn lost(&mut self, error: &MediaError) {
        let default = (!self.on_fallback)
            .then(|| Microphone::open(None))
            .and_then(Result::ok);
        match default {
            Some(mic) => {
                self.switch
                    .warn(format!("{error}; now using {}", mic.describe()));
                self.on_fallback = true;
                self.replace(Box::new(mic));
            }
            None => {
                self.switch
                    .warn(format!("{error}; no microphone: sending silence"));
                self.replace(Box::new(Silence));
            }
        }
    }
}

impl AudioSource for LiveMicrophone {
    fn next_frame(&mut self) -> Result<Vec<i16>, MediaError> {
        if let Some(name) = self.switch.take_wanted() {
            match Microphone::open(name.as_deref()) {
                Ok(mic) => {
                    self.on_fallback = false;
                    self.replace(Box::new(mic));
                }
                Err(e) => self
                    .switch
                    .warn(format!("{e}; still using {}", self.current.describe())),
            }
        }
        match self.current.next_frame() {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.lost(&e);
                Ok(vec![0; FRAME_SAMPLES])
            }
        }
    }

    fn describe(&self) -> String {
        self.current.describe()
    }
}

/// A speaker opened in the background, and whether it was chosen (not a fallback).
type OpenedSpeaker = (Box<dyn AudioSink>, bool);

/// The call's speaker (module docs).
pub struct LiveSpeaker {
    current: Option<Box<dyn AudioSink>>,
    /// A device being opened on its own thread lands here (and whether it was chosen,
    /// not a fallback).
    opened: Arc<Mutex<Option<OpenedSpeaker>>>,
    switch: DeviceSwitch,
    on_fallback: bool,
}

impl LiveSpeaker {
    pub fn new(speaker: Box<dyn AudioSink>, switch: DeviceSwitch) -> LiveSpeaker {
        switch.set_using(Some(speaker.describe()));
        LiveSpeaker {
            current: Some(speaker),
            opened: Arc::default(),
            switch,
            on_fallback: false,
        }
    }

    /// Opens `name` on a thread; it takes over at the next write once open. A failure is
    /// a warning, with `otherwise` saying what goes on.
    fn open_in_background(&self, name: Option<String>, chosen: bool, otherwise: String) {
        let (slot, switch) = (self.opened.clone(), self.switch.clone());
        let warning = otherwise.clone();
        let spawned = std::thread::Builder::new()
            .name("duet-speaker-open".into())
            .spawn(move || match Speaker::open(name.as_deref()) {
                Ok(speaker) => {
                    let speaker: Box<dyn AudioSink> = Box::new(speaker);
                    *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some((speaker, chosen));
                }
                Err(e) => switch.warn(format!("{e}; {warning}")),
            });
        if let Err(e) = spawned {
            self.switch
                .warn(format!("cannot open a speaker: {e}; {otherwise}"));
        }
    }
}

impl AudioSink for LiveSpeaker {
    fn write(&mut self, pcm: &[i16]) -> Result<(), MediaError> {
        if let Some(name) = self.switch.take_wanted() {
            let otherwise = match &self.current {
                Some(s) => format!("still using {}", s.describe()),
                None => "received audio is not played".into(),
            };
            self.open_in_background(name, true, otherwise);
        }
        let opened = self
            .opened
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((next, chosen)) = opened {
            self.switch.set_using(Some(next.describe()));
            // A device chosen by hand: a later loss may fall back to the default again.
            self.on_fallback &= !chosen;
            self.current = Some(next);
        }
        let Some(speaker) = self.current.as_mut() else {
            return Ok(());
        };
        if let Err(e) = speaker.write(pcm) {
            self.current = None;
            self.switch.set_using(None);
            if self.on_fallback {
                self.switch
                    .warn(format!("{e}; no speaker: received audio is not played"));
            } else {
                self.on_fallback = true;
                self.switch
                    .warn(format!("{e}; switching to the default speaker"));
                self.open_in_background(None, false, "received audio is not played".into());
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.current
            .as_ref()
            .map_or_else(|| "no speaker".into(), |s| s.describe())
    }
}
