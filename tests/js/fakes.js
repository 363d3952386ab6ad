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

/** Let pending promise callbacks run. */
function flush() {
  return new Promise((resolve) => setImmediate(resolve));
}

module.exports = { FakeWebSocket, FakeClock, FakePeerConnection, flush };
