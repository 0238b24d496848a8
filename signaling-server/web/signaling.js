// The signaling connection: one WebSocket to the server this page came from, JSON
// messages as in the protocol. When it drops while we hold a seat in a room, it comes
// back on its own and takes the seat back with `resume` (the media keeps flowing peer to
// peer meanwhile), as the desktop app does.

const BACKOFF_MS = [250, 500, 1000, 2000, 5000];
/** The server keeps a seat this long (its default --resume-grace). */
const RESUME_FOR_MS = 30000;

export function serverUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

export class Signaling {
  /**
   * `onMessage(msg)` gets every server message after `welcome`; `onStatus(status, detail)`
   * hears 'up', 'reconnecting', 'resumed', 'lost'.
   */
  constructor(onMessage, onStatus) {
    this.onMessage = onMessage;
    this.onStatus = onStatus;
    this.ws = null;
    this.iceServers = [];
    /** `{room, peer_id, resume_token}` while we are in a room. */
    this.seat = null;
    this.closing = false;
    this.downSince = null;
  }

  /** Opens the connection; resolves with the `welcome` message. */
  connect() {
    return new Promise((resolve, reject) => {
      let welcomed = false;
      let ws;
      try {
        ws = new WebSocket(serverUrl());
      } catch (e) {
        reject(new Error(`cannot reach the server: ${e.message}`));
        return;
      }
      this.ws = ws;
      ws.onmessage = (event) => {
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          console.warn('non-JSON message from the server', event.data);
          return;
        }
        if (!welcomed && msg.type === 'welcome') {
          welcomed = true;
          this.iceServers = Array.isArray(msg.ice_servers) ? msg.ice_servers : [];
          resolve(msg);
          return;
        }
        this.onMessage(msg);
      };
      ws.onclose = (event) => {
        if (!welcomed) {
          reject(new Error('the server closed the connection'));
          return;
        }
        if (this.ws === ws) this.dropped(`closed (${event.code})`);
      };
      ws.onerror = () => {
        // onclose follows with the details.
      };
    });
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  send(msg) {
    if (this.open) {
      this.ws.send(JSON.stringify(msg));
      return true;
    }
    console.warn('signaling is down; not sent:', msg.type);
    return false;
  }

  close() {
    this.closing = true;
    this.seat = null;
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }

  async dropped(detail) {
    this.ws = null;
    if (this.closing) return;
    if (!this.seat) {
      this.onStatus('lost', detail);
      return;
    }
    this.downSince = this.downSince ?? Date.now();
    this.onStatus('reconnecting', detail);
    for (let attempt = 0; ; attempt++) {
      await new Promise((r) => setTimeout(r, BACKOFF_MS[Math.min(attempt, BACKOFF_MS.length - 1)]));
      if (this.closing || !this.seat) return;
      if (Date.now() - this.downSince > RESUME_FOR_MS) {
        this.onStatus('lost', 'the server no longer keeps our seat');
        return;
      }
      try {
        await this.connect();
      } catch (e) {
        console.info('reconnecting:', e.message);
        continue;
      }
      const { room, peer_id, resume_token } = this.seat;
      this.send({ type: 'resume', room, peer_id, resume_token });
      this.downSince = null;
      // `joined` (or `error/resume_failed`) comes through onMessage.
      this.onStatus('resumed');
      return;
    }
  }
}
