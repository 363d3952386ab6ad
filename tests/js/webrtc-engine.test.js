// Unit tests of WebRTCEngine with a fake peer connection over a fake socket (node --test).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const path = require('node:path');
const { WebSocketManager } = require('../../web/static/js/websocket-manager.js');
const { WebRTCEngine } = require('../../web/static/js/webrtc-engine.js');
const { FakeWebSocket, FakeClock, FakePeerConnection, flush } = require('./fakes.js');

/** The server accepts the socket and, as it always does, sends its welcome first. */
function opened(socket) {
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [{ urls: ['stun:x'] }] } });
}

async function setup(options = {}) {
  FakeWebSocket.reset();
  FakePeerConnection.reset();
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
  });
  const video = { srcObject: 'previous', play: () => Promise.resolve() };
  const make = (streamId, extra = {}) => new WebRTCEngine({
    streamId, videoElement: video, manager, RTCPeerConnection: FakePeerConnection, timers: clock,
    ...options, ...extra,
  });
  return { manager, clock, video, make };
}

/** Start connect(), open the socket, and answer the offer. */
async function connectAndAnswer(engine) {
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  if (socket.readyState !== 1) opened(socket);
  await flush();
  await flush();
  const offer = socket.sent.filter((m) => m.type === 'offer' && m.streamId === engine.streamId).at(-1);
  socket.serverSends({ type: 'answer', streamId: engine.streamId, payload: 'v=0 answer', sessionId: offer.payload.sessionId });
  await connecting;
  return { socket, offer };
}

test('needs a streamId', () => {
  assert.throws(() => new WebRTCEngine({}), /streamId/);
});

test('connect sends a recvonly offer over the shared socket and applies the answer', async () => {
  const { make } = await setup();
  const engine = make('cam-1');
  const { socket, offer } = await connectAndAnswer(engine);
  const pc = FakePeerConnection.last();
  assert.deepEqual(pc.transceivers, [{ kind: 'video', init: { direction: 'recvonly' } }]);
  // The ICE servers are the ones the server announced (waited for, even if it speaks late).
  assert.deepEqual(pc.config.iceServers, [{ urls: ['stun:x'] }]);
  assert.equal(offer.payload.type, 'offer');
  assert.equal(offer.payload.streamId, 'cam-1'); // legacy servers read it there
  assert.match(offer.payload.sessionId, /.+-\d+/);
  assert.equal(pc.remoteDescription.sdp, 'v=0 answer');
  assert.equal(engine.state, 'connecting');
  assert.equal(FakeWebSocket.instances.length, 1);
  socket.serverSends({ type: 'state', streamId: 'cam-1', payload: { state: 'live' } });
  const events = [];
  engine.on('connected', () => events.push('connected'));
  pc.becomes('connected');
  assert.equal(engine.state, 'live');
  assert.deepEqual(events, ['connected']);
});

test('N engines share one socket and one manager', async () => {
  const { make, manager } = await setup();
  const engines = ['a', 'b', 'c', 'd'].map((id) => make(id));
  for (const engine of engines) await connectAndAnswer(engine);
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(manager.streamHandlers.size, 4);
});

test('browser ICE candidates are trickled with the session id', async () => {
  const { make } = await setup();
  const engine = make('cam-1');
  const { socket, offer } = await connectAndAnswer(engine);
  const pc = FakePeerConnection.last();
  pc.onicecandidate({ candidate: { candidate: 'candidate:1 1 udp 1 10.0.0.1 9 typ host', sdpMid: '0', sdpMLineIndex: 0 } });
  pc.onicecandidate({ candidate: null });
  const ice = socket.sent.filter((m) => m.type === 'ice');
  assert.equal(ice.length, 2);
  assert.equal(ice[0].payload.sessionId, offer.payload.sessionId);
  assert.equal(ice[1].payload.candidate, '');
});

test('an answer for an older session is ignored', async () => {
  const { make } = await setup();
  const engine = make('cam-1');
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  opened(socket);
  await flush();
  const offer = socket.sent.find((m) => m.type === 'offer');
  socket.serverSends({ type: 'answer', streamId: 'cam-1', payload: 'stale', sessionId: 'old-1' });
  socket.serverSends({ type: 'answer', streamId: 'cam-1', payload: 'fresh', sessionId: offer.payload.sessionId });
  await connecting;
  assert.equal(FakePeerConnection.last().remoteDescription.sdp, 'fresh');
});

test('a stream the server does not know rejects connect and ends in the error state', async () => {
  const { make } = await setup();
  const engine = make('nope');
  const errors = [];
  engine.on('error', (e) => errors.push(e.code));
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  opened(socket);
  await flush();
  socket.serverSends({ type: 'error', streamId: 'nope', payload: 'Stream not found', code: 'stream_not_found' });
  await assert.rejects(connecting, /Stream not found/);
  assert.equal(engine.state, 'error');
  assert.deepEqual(errors, ['stream_not_found']);
});

for (const code of ['cluster_unavailable', 'relay_failed']) {
  test(`a cluster's ${code} during an offer is not final: the engine offers again after its backoff`, async () => {
    const { make, clock } = await setup({ statsInterval: 0 });
    const engine = make('cam');
    const errors = [];
    engine.on('error', (e) => errors.push([e.code, e.recoverable]));
    const connecting = engine.connect();
    connecting.catch(() => {}); // what matters here is the retry, whichever way connect settles
    await flush();
    const socket = FakeWebSocket.last();
    opened(socket);
    await flush();
    await flush();
    socket.serverSends({ type: 'error', streamId: 'cam', payload: 'Unavailable: Redis at 127.0.0.1:6379 did not answer', code });
    await flush();
    assert.deepEqual(errors, [[code, true]]);
    assert.equal(engine.state, 'reconnecting');
    clock.advance(clock.pending()[0]);
    await flush();
    await flush();
    const offers = socket.sent.filter((m) => m.type === 'offer' && m.streamId === 'cam');
    assert.equal(offers.length, 2, 'a second offer after the backoff');
  });
}

test('a failed peer connection renegotiates by itself; the other streams are untouched', async () => {
  const { make, clock } = await setup({ statsInterval: 0 });
  const a = make('a');
  const b = make('b');
  await connectAndAnswer(a);
  const { socket } = await connectAndAnswer(b);
  const pcA = FakePeerConnection.instances[0];
  const pcB = FakePeerConnection.instances[1];
  pcA.becomes('connected');
  pcB.becomes('connected');
  pcA.becomes('failed');
  assert.equal(a.state, 'reconnecting');
  assert.ok(pcA.closed);
  const delay = clock.pending()[0];
  assert.ok(delay >= 1000 && delay <= 1200, `retry after ${delay} ms`);
  clock.advance(delay);
  await flush();
  const offers = socket.sent.filter((m) => m.type === 'offer' && m.streamId === 'a');
  assert.equal(offers.length, 2);
  assert.notEqual(offers[0].payload.sessionId, offers[1].payload.sessionId);
  assert.equal(pcB.closed, false);
  assert.equal(b.state, 'live');
  socket.serverSends({ type: 'answer', streamId: 'a', payload: 'v=0 again', sessionId: offers[1].payload.sessionId });
  await flush();
  FakePeerConnection.last().becomes('connected');
  assert.equal(a.state, 'live');
});

test('after the socket comes back every engine renegotiates', async () => {
  const { make, clock } = await setup();
  const engine = make('a');
  const { socket } = await connectAndAnswer(engine);
  FakePeerConnection.last().becomes('connected');
  socket.serverDrops();
  assert.equal(engine.state, 'reconnecting');
  clock.advance(1200);
  const next = FakeWebSocket.last();
  assert.notEqual(next, socket);
  opened(next);
  await flush();
  const offer = next.sent.find((m) => m.type === 'offer');
  assert.ok(offer, 'a new offer on the new socket');
  assert.equal(offer.streamId, 'a');
});

test('server-side camera states are reflected', async () => {
  const { make } = await setup();
  const engine = make('a');
  const { socket } = await connectAndAnswer(engine);
  FakePeerConnection.last().becomes('connected');
  const states = [];
  engine.on('state', (s) => states.push(s.state));
  socket.serverSends({ type: 'state', streamId: 'a', payload: { state: 'reconnecting', detail: 'camera lost' } });
  socket.serverSends({ type: 'state', streamId: 'a', payload: { state: 'offline' } });
  socket.serverSends({ type: 'state', streamId: 'a', payload: { state: 'live' } });
  assert.deepEqual(states, ['reconnecting', 'offline', 'live']);
});

test('disconnect is idempotent and frees the peer, timers, listeners and the session', async () => {
  const { make, manager, clock, video } = await setup();
  const engine = make('a');
  const { socket } = await connectAndAnswer(engine);
  FakePeerConnection.last().becomes('connected');
  let stats = 0;
  engine.on('stats', () => stats++);
  clock.advance(1000);
  await flush();
  assert.equal(stats, 1);
  const disconnected = [];
  engine.on('disconnected', () => disconnected.push(1));
  engine.disconnect();
  engine.disconnect();
  assert.deepEqual(disconnected, [1]);
  assert.ok(FakePeerConnection.last().closed);
  assert.equal(engine.pc, null);
  assert.equal(video.srcObject, null);
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'a' });
  assert.equal(manager.streamHandlers.size, 0);
  assert.equal(socket.closedWith.code, 1000); // it was the page's last stream
  assert.deepEqual(clock.pending(), []);
  clock.advance(5000);
  await flush();
  assert.equal(stats, 1);
  assert.equal(engine.state, 'closed');
});

test('stats report bitrate, packets, frames, fps and time to first frame', async () => {
  const { make, clock } = await setup();
  const engine = make('a');
  await connectAndAnswer(engine);
  const pc = FakePeerConnection.last();
  pc.becomes('connected');
  let bytes = 0;
  let frames = 0;
  pc.getStats = async () => new Map([['in', {
    type: 'inbound-rtp', kind: 'video', bytesReceived: bytes, packetsReceived: frames * 2,
    packetsLost: 1, framesDecoded: frames, frameWidth: 640, frameHeight: 360,
    jitterBufferDelay: frames * 0.05, jitterBufferEmittedCount: frames,
  }]]);
  pc.iceConnectionState = 'connected';
  const seen = [];
  engine.on('stats', (s) => seen.push(s));
  bytes = 0; frames = 0;
  clock.advance(1000);
  await flush();
  bytes = 100_000; frames = 25;
  clock.advance(1000);
  await flush();
  const last = seen.at(-1);
  assert.equal(last.bitrateKbps, 800);
  assert.equal(last.fps, 25);
  assert.equal(last.packetsReceived, 50);
  assert.equal(last.packetsLost, 1);
  assert.equal(last.iceState, 'connected');
  assert.equal(last.jitterBufferMs, 50);
  assert.ok(last.timeToFirstFrameMs !== null);
});

test('renegotiations back off on the shared schedule: 1 s, 2 s, 4 s, plus up to 20 %', async () => {
  const { make, clock } = await setup({ statsInterval: 0 });
  const engine = make('a');
  await connectAndAnswer(engine);
  FakePeerConnection.last().becomes('connected');
  for (const base of [1000, 2000, 4000]) {
    FakePeerConnection.last().becomes('failed'); // no answer, no recovery: the attempts add up
    const delay = clock.pending()[0];
    assert.ok(delay >= base && delay <= base * 1.2, `retry after ${delay} ms, expected ${base}–${base * 1.2}`);
    const peers = FakePeerConnection.instances.length;
    clock.advance(delay);
    await flush();
    assert.equal(FakePeerConnection.instances.length, peers + 1);
  }
  assert.equal(engine.state, 'reconnecting');
});

test('the engine needs only its typed seam of the manager (SignalingChannel), not a WebSocketManager', async () => {
  FakePeerConnection.reset();
  const clock = new FakeClock();
  const sent = [];
  const listeners = [];
  let handlers = null;
  let unregistered = 0;
  // Exactly SignalingChannel's members, and nothing else.
  const channel = {
    instanceId: 'seam',
    serverInfo: { iceServers: [{ urls: ['stun:seam'] }] },
    connect: async () => {},
    isConnected: () => true,
    send: (type, streamId, payload) => { sent.push({ type, streamId, payload }); return true; },
    registerStream: (streamId, registered) => {
      handlers = registered;
      return () => { unregistered += 1; };
    },
    on: (event, callback) => {
      listeners.push(event);
      return () => listeners.splice(listeners.indexOf(event), 1);
    },
  };
  const engine = new WebRTCEngine({
    streamId: 'cam', manager: channel, RTCPeerConnection: FakePeerConnection, timers: clock,
  });
  const connecting = engine.connect();
  await flush();
  const offer = sent.find((m) => m.type === 'offer');
  assert.equal(offer.streamId, 'cam');
  assert.match(offer.payload.sessionId, /^seam-\d+$/);
  assert.deepEqual(FakePeerConnection.last().config.iceServers, [{ urls: ['stun:seam'] }]);
  handlers.answer('v=0 seam', { type: 'answer', streamId: 'cam', sessionId: offer.payload.sessionId });
  await connecting;
  assert.equal(FakePeerConnection.last().remoteDescription.sdp, 'v=0 seam');
  assert.deepEqual(listeners, ['disconnected']);
  engine.disconnect();
  assert.equal(unregistered, 1);
  assert.deepEqual(listeners, []);
});

test("disconnecting an engine leaves another engine's registration of the same stream alone", async () => {
  const { make, manager } = await setup();
  const first = make('cam');
  const { socket } = await connectAndAnswer(first);
  const second = make('cam');
  await connectAndAnswer(second); // takes over the stream id's routing
  const routing = manager.streamHandlers.get('cam');
  first.disconnect();
  assert.equal(manager.streamHandlers.get('cam'), routing);
  assert.equal(socket.sent.filter((m) => m.type === 'close').length, 0);
  second.disconnect();
  assert.equal(manager.streamHandlers.has('cam'), false);
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'cam' });
});

test("an engine's throwing listener is logged and the other listeners still run", async () => {
  const { make } = await setup();
  const engine = make('a');
  const seen = [];
  const logged = [];
  const original = console.error;
  console.error = (...args) => logged.push(args.join(' '));
  try {
    engine.on('state', () => { throw new Error('boom'); });
    const off = engine.on('state', (s) => seen.push(s.state));
    await connectAndAnswer(engine);
    off();
    engine.disconnect();
  } finally {
    console.error = original;
  }
  assert.deepEqual(seen, ['connecting']);
  assert.ok(logged.some((line) => /a: "state" listener failed/.test(line)), logged.join('\n'));
});

test('under Node, webrtc-engine.js loads websocket-manager.js by itself', () => {
  const engineScript = path.join(__dirname, '../../web/static/js/webrtc-engine.js');
  const output = execFileSync(process.execPath, ['-e', `
    const { WebRTCEngine } = require(${JSON.stringify(engineScript)});
    const engine = new WebRTCEngine({ streamId: 'x' });
    console.log(typeof globalThis.WebSocketManager, engine.state);
  `], { encoding: 'utf8' });
  assert.equal(output.trim(), 'function idle');
});
