// Sentences for everything the server or the call can say: what the person reads.

/** A local, readable form of an RFC 3339 time: "Friday 20 November, 10:00". */
export function localTime(rfc3339) {
  const when = new Date(rfc3339);
  if (Number.isNaN(when.getTime())) return rfc3339;
  const sameDay = when.toDateString() === new Date().toDateString();
  const time = when.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (sameDay) return `${time} today`;
  const day = when.toLocaleDateString([], { weekday: 'long', day: 'numeric', month: 'long' });
  return `${day}, ${time}`;
}

/** An `error` message from the server as a sentence. `context` says what we were doing. */
export function errorSentence(msg, context = {}) {
  const code = msg.code;
  switch (code) {
    case 'not_started':
      return `This meeting has not started yet: it opens at ${localTime(msg.starts_at)}. ` +
        'You can join from 5 minutes before.';
    case 'room_ended':
      return 'This meeting has ended; nobody can join it any more.';
    case 'not_host':
      return context.joining
        ? 'The host link for this meeting is not valid. Open the plain invite link to join as a guest.'
        : 'Only the host can end the meeting.';
    case 'name_taken':
      return `The name "${context.name ?? ''}" is already signed in somewhere else. Pick another one.`;
    case 'bad_field':
      return `The server refused that: ${msg.message}.`;
    case 'bad_json':
    case 'unknown_type':
      return `The server did not understand this page (${msg.message}). Reload the page.`;
    case 'too_large':
      return 'That message is too large to send.';
    case 'rate_limited':
      return 'Too much at once: the server is slowing this page down. Wait a moment.';
    case 'not_in_call':
      return 'You are not in a call any more.';
    case 'unknown_call':
      return 'That call is not ringing any more.';
    case 'resume_failed':
      return 'The connection to the server dropped and the call could not be taken back.';
    case 'unavailable':
      return `The server cannot do that right now (${msg.message}). Try again in a moment.`;
    case 'internal':
      return `The server had a problem (${msg.message}). Try again.`;
    default:
      return `The server said: ${msg.message ?? code}.`;
  }
}

/** Why a call ended, as a sentence. */
export function endSentence(why, who = 'The other person') {
  switch (why.kind) {
    case 'hung_up': return 'You hung up.';
    case 'peer_left':
      return why.reason === 'disconnected'
        ? `${who}'s connection dropped and did not come back.`
        : `${who} hung up.`;
    case 'room_full': return 'This room already has two people in it. Try again when one of them has left.';
    case 'room_ended':
      if (why.reason === 'expired') return 'The meeting has expired.';
      return why.byMe ? 'You ended the meeting for everyone.' : 'The host ended the meeting.';
    case 'refused': return errorSentence(why.msg, why.context);
    case 'rejected': return rejectSentence(why.reason, why.to);
    case 'cancelled': return `${who} gave up before you answered.`;
    case 'media_failed': return 'The media connection could not be established or was lost.';
    case 'server_lost': return 'Lost the connection to the server.';
    case 'no_devices': return `Could not use the camera or microphone: ${why.detail}.`;
    default: return why.detail ?? 'The call ended.';
  }
}

/** `call_rejected.reason` as a sentence. */
export function rejectSentence(reason, to) {
  switch (reason) {
    case 'rejected': return `${to} declined the call.`;
    case 'no_answer': return `${to} did not answer.`;
    case 'busy': return `${to} is in another call.`;
    case 'offline': return `${to} is not signed in right now.`;
    default: return `The call to ${to} did not happen (${reason}).`;
  }
}
