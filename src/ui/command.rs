//! [`UiCommand`]: what a person asks for in a view. Views only draw and return these;
//! the app's update step carries them out before the next frame is drawn
//! ([`super::App::apply`]), so no drawing code starts a call, a task or a device.

use crate::call::Command;

/// One thing a view asks of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UiCommand {
    /// Join the lobby's room or meeting (**Call**, or Enter in the room field).
    Call,
    /// Ring the person named in the lobby (**Ring**).
    Dial,
    /// Answer the ringing call.
    Accept,
    /// Turn the ringing call down (the caller is told).
    Decline,
    /// Create a meeting: now, or at the date and time picked in the lobby.
    CreateMeeting {
        scheduled: bool,
    },
    /// Sign in as the lobby's name, for direct calls.
    SignIn,
    SignOut,
    /// Leave the call, or stop setting it up, and go back to the lobby.
    HangUp,
    /// For the running call's session: mute, camera, chat, devices, end the meeting.
    Session(Command),
}
