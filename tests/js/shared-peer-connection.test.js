// Unit tests of the shared peer connection's negotiation queue (pure logic, node --test).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { NegotiationQueue } = require('../../web/static/js/webrtc-engine.js');

/** A negotiation that runs until the test ends it, recording how many run at once. */
function controlledRuns() {
  const log = { started: 0, running: 0, maxRunning: 0, finish: /** @type {(() => void)[]} */ ([]), fail: /** @type {((e: Error) => void)[]} */ ([]) };
  const run = () => new Promise((resolve, reject) => {
    log.started += 1;
    log.running += 1;
    log.maxRunning = Math.max(log.maxRunning, log.running);
    log.finish.push(() => { log.running -= 1; resolve(undefined); });
    log.fail.push((error) => { log.running -= 1; reject(error); });
  });
  return { log, run };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

test('one negotiation at a time: requests during a run wait for it', async () => {
  const { log, run } = controlledRuns();
  const queue = new NegotiationQueue(run);
  const first = queue.request();
  await tick();
  assert.equal(log.started, 1);
  assert.equal(queue.busy, true);
  const second = queue.request();
  await tick();
  assert.equal(log.started, 1, 'the second waits for the first to end');
  log.finish[0]();
  await first;
  await tick();
  assert.equal(log.started, 2);
  log.finish[1]();
  await second;
  await tick();
  assert.equal(log.maxRunning, 1);
  assert.equal(queue.busy, false);
});

test('requests made during one run share the next run (tiles added at once: one offer)', async () => {
  const { log, run } = controlledRuns();
  const queue = new NegotiationQueue(run);
  const first = queue.request();
  await tick();
  const later = [queue.request(), queue.request(), queue.request()];
  log.finish[0]();
  await first;
  await tick();
  assert.equal(log.started, 2, 'three requests, one more run');
  log.finish[1]();
  await Promise.all(later);
  assert.equal(queue.runs, 2);
});

test('a failed run rejects its own requests only; the next run goes ahead', async () => {
  const { log, run } = controlledRuns();
  const queue = new NegotiationQueue(run);
  const first = queue.request();
  await tick();
  const second = queue.request();
  log.fail[0](new Error('answer timeout'));
  await assert.rejects(first, /answer timeout/);
  await tick();
  assert.equal(log.started, 2);
  log.finish[1]();
  await second;
});

test('a request after the queue went idle starts a run at once', async () => {
  const { log, run } = controlledRuns();
  const queue = new NegotiationQueue(run);
  const first = queue.request();
  await tick();
  log.finish[0]();
  await first;
  await tick();
  assert.equal(queue.busy, false);
  const again = queue.request();
  await tick();
  assert.equal(log.started, 2);
  log.finish[1]();
  await again;
});

// --- engines on one shared peer connection (a fake RTCPeerConnection with transceivers) ------

const { WebSocketManager } = require('../../web/static/js/websocket-manager.js');
const { WebRTCEngine } = require('../../web/static/js/webrtc-engine.js');
const { FakeWebSocket, FakeClock, flush } = require('./fakes.js');

/** Enough of RTCPeerConnection for a shared connection: transceivers get mids at the offer. */
class FakeBundledPeer {
  static instances = [];

  constructor(config) {
    this.config = config;
    this.connectionState = 'new';
    this.iceConnectionState = 'new';
    this.transceivers = [];
    this.closed = false;
    this.localDescription = null;
    this.remoteDescriptions = [];
    FakeBundledPeer.instances.push(this);
  }

  addTransceiver(kind, init) {
    const transceiver = {
      kind, direction: init.direction, mid: null, stopped: false,
      receiver: { getStats: async () => new Map([['in', { type: 'inbound-rtp', kind: 'video', framesDecoded: 7 }]]) },
      stop() { this.stopped = true; },
    };
    this.transceivers.push(transceiver);
    return transceiver;
  }

  async createOffer() {
    this.transceivers.forEach((t, index) => { if (t.mid === null) t.mid = String(index); });
    const lines = this.transceivers.map((t) => `m=video ${t.stopped ? 0 : 9} a=mid:${t.mid}`);
    return { type: 'offer', sdp: `v=0\r\n${lines.join('\r\n')}\r\n` };
  }

  async setLocalDescription(description) {
    this.localDescription = description;
  }

  async setRemoteDescription(description) {
    this.remoteDescriptions.push(description);
  }

  close() {
    this.closed = true;
    this.connectionState = 'closed';
  }

  becomes(state) {
    this.connectionState = state;
    this.onconnectionstatechange && this.onconnectionstatechange();
  }
}

async function sharedSetup() {
  FakeWebSocket.reset();
  FakeBundledPeer.instances = [];
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
    shared: false, peerConnection: 'shared',
  });
  const make = (streamId) => new WebRTCEngine({
    streamId, manager, RTCPeerConnection: /** @type {any} */ (FakeBundledPeer), timers: clock, statsInterval: 0,
  });
  return { manager, clock, make };
}

/** The server's side of one negotiation: answer the last offer of `~id`, wait for `applied`. */
async function answerLastOffer(socket) {
  const offer = socket.sent.filter((m) => m.type === 'offer').at(-1);
  socket.serverSends({ type: 'answer', streamId: offer.streamId, payload: `v=0 answer to ${offer.payload.sdp.length}` });
  for (let i = 0; i < 5; i++) await flush();
  return offer;
}

test('engines added at once share one peer connection and one offer after the first', async () => {
  const { make } = await sharedSetup();
  const engines = ['cam-1', 'cam-2', 'cam-3'].map(make);
  const connecting = engines.map((e) => e.connect());
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  for (let i = 0; i < 5; i++) await flush();
  const first = await answerLastOffer(socket);
  const second = await answerLastOffer(socket);
  await Promise.all(connecting);
  assert.equal(FakeBundledPeer.instances.length, 1, 'one RTCPeerConnection for the page');
  const pc = FakeBundledPeer.instances[0];
  assert.equal(pc.config.bundlePolicy, 'max-bundle');
  assert.equal(pc.transceivers[0].direction, 'inactive', 'the anchor comes first');
  assert.match(first.streamId, /^~/);
  // The anchor's mid is in no mapping; every tile's is, in one of the two offers.
  assert.equal('0' in first.payload.streams, false);
  assert.equal('0' in second.payload.streams, false);
  assert.deepEqual(second.payload.streams, { 1: 'cam-1', 2: 'cam-2', 3: 'cam-3' });
  const offers = socket.sent.filter((m) => m.type === 'offer');
  const applied = socket.sent.filter((m) => m.type === 'applied');
  assert.equal(offers.length, 2, 'tiles added during the first negotiation share the next offer');
  assert.equal(applied.length, 2, 'each answer applied is confirmed');
  assert.equal(pc.remoteDescriptions.length, 2);
  // Joining a connection that is up: each engine goes live from the connection's state.
  pc.becomes('connected');
  assert.deepEqual(engines.map((e) => e.state), ['live', 'live', 'live']);
});

test('a tile that leaves stops its transceiver and renegotiates; the last one closes it all', async () => {
  const { make } = await sharedSetup();
  const [a, b] = ['cam-1', 'cam-2'].map(make);
  const connecting = [a.connect(), b.connect()];
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  for (let i = 0; i < 5; i++) await flush();
  await answerLastOffer(socket);
  if (socket.sent.filter((m) => m.type === 'offer').length === 2) await answerLastOffer(socket);
  await Promise.all(connecting);
  const pc = FakeBundledPeer.instances[0];
  a.disconnect();
  for (let i = 0; i < 5; i++) await flush();
  const offer = socket.sent.filter((m) => m.type === 'offer').at(-1);
  assert.deepEqual(offer.payload.streams, { 2: 'cam-2' });
  assert.equal(pc.transceivers[1].stopped, true);
  await answerLastOffer(socket);
  assert.equal(pc.closed, false);
  b.disconnect();
  assert.equal(pc.closed, true);
  assert.ok(socket.sent.some((m) => m.type === 'close' && m.streamId === offer.streamId));
});

test("the server's error about one stream fails that tile only", async () => {
  const { make } = await sharedSetup();
  const engines = ['cam-1', 'nope'].map(make);
  const connecting = engines.map((e) => e.connect().catch((error) => error));
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  for (let i = 0; i < 5; i++) await flush();
  const peerId = socket.sent.find((m) => m.type === 'offer').streamId;
  await answerLastOffer(socket);
  if (socket.sent.filter((m) => m.type === 'offer').length === 2) {
    socket.serverSends({ type: 'error', streamId: peerId, payload: 'Stream not found', code: 'stream_not_found', stream: 'nope' });
    await answerLastOffer(socket);
  } else {
    socket.serverSends({ type: 'error', streamId: peerId, payload: 'Stream not found', code: 'stream_not_found', stream: 'nope' });
  }
  const [ok, refused] = await Promise.all(connecting);
  assert.equal(ok, undefined);
  assert.match(String(refused), /Stream not found/);
  assert.equal(engines[1].state, 'error');
  assert.notEqual(engines[0].state, 'error');
  assert.equal(FakeBundledPeer.instances[0].closed, false);
});
