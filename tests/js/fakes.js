// Test doubles for the browser scripts: a WebSocket, a clock, an RTCPeerConnection.
'use strict';

class FakeWebSocket {
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.instances.push(this);
  }

  send(data) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(JSON.parse(data));
  }

  close(code, reason) {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }

  // --- driven by the tests ---
  serverOpens() {
    this.readyState = 1;
    this.onopen && this.onopen();
  }

  serverSends(message) {
    this.onmessage && this.onmessage({ data: typeof message === 'string' ? message : JSON.stringify(message) });
  }

  serverDrops(code = 1006) {
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason: '' });
  }

  static last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  static reset() {
    FakeWebSocket.instances = [];
  }
}

class FakeClock {
  constructor() {
    this.time = 0;
    this.timers = new Map();
    this.nextId = 1;
  }

  setTimeout(fn, ms) {
    const id = this.nextId++;
    this.timers.set(id, { at: this.time + ms, fn });
    return id;
  }

  clearTimeout(id) {
    this.timers.delete(id);
  }

  setInterval(fn, ms) {
    const id = this.nextId++;
    const tick = () => {
      this.timers.set(id, { at: this.time + ms, fn: tick });
      fn();
    };
    this.timers.set(id, { at: this.time + ms, fn: tick });
    return id;
  }

  clearInterval(id) {
    this.timers.delete(id);
  }

  now() {
    return this.time;
  }

  /** Move time forward, running every timer that falls due, in order. */
  advance(ms) {
    const until = this.time + ms;
    for (;;) {
      const due = [...this.timers.entries()].filter(([, t]) => t.at <= until).sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.time = due[1].at;
      due[1].fn();
    }
    this.time = until;
  }

  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }
}

class FakePeerConnection {
  static instances = [];

  constructor(config) {
    this.config = config;
    this.connectionState = 'new';
    this.iceConnectionState = 'new';
    this.transceivers = [];
    this.closed = false;
    this.remoteDescription = null;
    FakePeerConnection.instances.push(this);
  }

  addTransceiver(kind, init) {
    this.transceivers.push({ kind, init });
  }

  async createOffer() {
    return { type: 'offer', sdp: `v=0\r\nfake-offer-${FakePeerConnection.instances.length}\r\n` };
  }

  async setLocalDescription(description) {
    this.localDescription = description;
  }

  async setRemoteDescription(description) {
    this.remoteDescription = description;
  }

  async getStats() {
    return new Map();
  }

  close() {
    this.closed = true;
    this.connectionState = 'closed';
  }

  // --- driven by the tests ---
  becomes(state) {
    this.connectionState = state;
    this.onconnectionstatechange && this.onconnectionstatechange();
  }

  static last() {
    return FakePeerConnection.instances[FakePeerConnection.instances.length - 1];
  }

  static reset() {
    FakePeerConnection.instances = [];
  }
}

/**
 * Web Locks (navigator.locks) for one origin: exclusive locks granted in request order, held
 * until the callback's promise settles. `kill(name)` lets go of a held lock as the browser does
 * when the holder's document or worker dies.
 */
class FakeLocks {
  constructor() {
    this.holders = new Map(); // name -> kill()
    this.queues = new Map(); // name -> [grant()]
  }

  request(name, callback) {
    return new Promise((resolve, reject) => {
      const grant = () => {
        let kill;
        const killed = new Promise((r) => { kill = r; });
        this.holders.set(name, kill);
        const done = Promise.resolve().then(() => callback({ name, mode: 'exclusive' }));
        done.then(resolve, reject);
        Promise.race([done.catch(() => {}), killed]).then(() => this.release(name, kill));
      };
      if (this.holders.has(name)) {
        if (!this.queues.has(name)) this.queues.set(name, []);
        this.queues.get(name).push(grant);
      } else {
        grant();
      }
    });
  }

  release(name, kill) {
    if (this.holders.get(name) !== kill) return;
    this.holders.delete(name);
    const next = this.queues.has(name) ? this.queues.get(name).shift() : undefined;
    if (next) next();
  }

  kill(name) {
    const kill = this.holders.get(name);
    if (kill) kill();
  }
}

/** Let pending promise callbacks run. */
function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

module.exports = { FakeWebSocket, FakeClock, FakePeerConnection, FakeLocks, flush };
