// Unit tests of WebSocketManager against a fake WebSocket and a fake clock (node --test).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { WebSocketManager, MediaStreamEmitter, backoffDelay } = require('../../web/static/js/websocket-manager.js');
const { FakeWebSocket, FakeClock } = require('./fakes.js');

function makeManager(options = {}) {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
    ...options,
  });
  return { manager, clock };
}

async function connected(options) {
  const made = makeManager(options);
  const opening = made.manager.connect();
  FakeWebSocket.last().serverOpens();
  await opening;
  return { ...made, socket: FakeWebSocket.last() };
}

test('getInstance returns one manager per page, with a short instance id', () => {
  WebSocketManager.resetInstance();
  const a = WebSocketManager.getInstance({ url: 'ws://x/ws', WebSocket: FakeWebSocket, logLevel: 'silent' });
  const b = WebSocketManager.getInstance();
  assert.equal(a, b);
  assert.match(a.instanceId, /^[a-z0-9]{1,8}$/);
  assert.ok(a.streamHandlers instanceof Map);
  assert.ok(a.globalHandlers instanceof Map);
  assert.equal(a.connected, false);
  assert.equal(a.reconnecting, false);
  WebSocketManager.resetInstance();
});

test('connect opens one socket and later calls reuse it', async () => {
  const { manager, socket } = await connected();
  await manager.connect();
  await manager.connect();
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(manager.ws, socket);
  assert.ok(manager.isConnected());
});

test('concurrent connects share the socket being opened', async () => {
  const { manager } = makeManager();
  const first = manager.connect();
  const second = manager.connect();
  FakeWebSocket.last().serverOpens();
  await Promise.all([first, second]);
  assert.equal(FakeWebSocket.instances.length, 1);
});

test('the token travels as a query parameter', async () => {
  const { manager } = makeManager();
  const opening = manager.connect({ token: 'a b&c' });
  assert.equal(FakeWebSocket.last().url, 'ws://server.test/ws?token=a%20b%26c');
  FakeWebSocket.last().serverOpens();
  await opening;
});

test('the default URL is the page origin, ws: or wss: to match', () => {
  const page = globalThis;
  for (const [protocol, expected] of [['http:', 'ws://cams.test:8107/ws'], ['https:', 'wss://cams.test:8107/ws']]) {
    page.location = { protocol, host: 'cams.test:8107', search: '' };
    FakeWebSocket.reset();
    const manager = new WebSocketManager({ WebSocket: FakeWebSocket, logLevel: 'silent', pingInterval: 0 });
    manager.connect().catch(() => {});
    assert.equal(FakeWebSocket.last().url, expected);
    manager.disconnect();
  }
  delete page.location;
});

test('messages are routed by streamId, then by type', async () => {
  const { manager, socket } = await connected();
  const seen = [];
  manager.registerStream('cam-1', {
    answer: (payload, raw) => seen.push(['cam-1 answer', payload, raw.sessionId]),
    onError: (payload) => seen.push(['cam-1 error', payload]),
  });
  manager.registerStream('cam-2', { answer: (payload) => seen.push(['cam-2 answer', payload]) });
  socket.serverSends({ type: 'answer', streamId: 'cam-2', payload: 'sdp-2' });
  socket.serverSends({ type: 'answer', streamId: 'cam-1', payload: 'sdp-1', sessionId: 's1' });
  socket.serverSends({ type: 'error', streamId: 'cam-1', payload: 'bad', code: 'invalid_sdp' });
  assert.deepEqual(seen, [
    ['cam-2 answer', 'sdp-2'],
    ['cam-1 answer', 'sdp-1', 's1'],
    ['cam-1 error', 'bad'],
  ]);
});

test('a message for an unknown stream is reported, never thrown', async () => {
  const { manager, socket } = await connected();
  const unknown = [];
  manager.on('unknownStream', (m) => unknown.push(m.streamId));
  assert.doesNotThrow(() => socket.serverSends({ type: 'answer', streamId: 'ghost', payload: 'x' }));
  assert.doesNotThrow(() => socket.serverSends('not json at all'));
  assert.doesNotThrow(() => socket.serverSends({ streamId: 'x' }));
  assert.deepEqual(unknown, ['ghost']);
});

test('a throwing stream handler does not break routing to the others', async () => {
  const { manager, socket } = await connected();
  const seen = [];
  manager.registerStream('a', { answer: () => { throw new Error('boom'); } });
  manager.registerStream('b', { answer: () => seen.push('b') });
  socket.serverSends({ type: 'answer', streamId: 'a', payload: '' });
  socket.serverSends({ type: 'answer', streamId: 'b', payload: '' });
  assert.deepEqual(seen, ['b']);
});

test('welcome is kept as serverInfo and emitted', async () => {
  const { manager, socket } = await connected();
  let welcomed = null;
  manager.on('welcome', (info) => { welcomed = info; });
  socket.serverSends({ type: 'welcome', streamId: null, payload: { connectionId: 'c1', iceServers: [{ urls: ['stun:x'] }] } });
  assert.equal(manager.serverInfo.connectionId, 'c1');
  assert.deepEqual(welcomed.iceServers, [{ urls: ['stun:x'] }]);
});

test('unregistering a stream tells the server, and the last one closes the socket', async () => {
  const { manager, socket } = await connected();
  manager.registerStream('a', {});
  manager.registerStream('b', {});
  manager.unregisterStream('a');
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'a' });
  assert.equal(socket.closedWith, null);
  manager.unregisterStream('b');
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'b' });
  assert.equal(socket.closedWith.code, 1000);
  assert.equal(manager.isConnected(), false);
  assert.equal(manager.ws, null);
  manager.unregisterStream('b'); // twice is harmless
});

test('messages sent before the socket opens are queued, urgent ones first', async () => {
  const { manager } = makeManager();
  const opening = manager.connect();
  assert.equal(manager.send('ping', null, { id: 1 }), false);
  manager.send('metrics', null, {});
  manager.send('offer', 'cam', { sdp: 'v=0' });
  manager.send('ice', 'cam', { candidate: 'c' });
  FakeWebSocket.last().serverOpens();
  await opening;
  assert.deepEqual(FakeWebSocket.last().sent.map((m) => m.type), ['offer', 'ice', 'ping', 'metrics']);
  assert.equal(manager.send('ping', null, {}), true);
});

test('sendBatch sends urgent messages ahead of routine ones', async () => {
  const { manager, socket } = await connected();
  const sent = manager.sendBatch([
    { type: 'ping', payload: { id: 9 } },
    { type: 'offer', streamId: 'a', payload: { sdp: 'v=0' } },
    { type: 'close', streamId: 'b' },
  ]);
  assert.equal(sent, 3);
  assert.deepEqual(socket.sent.map((m) => [m.type, m.streamId]), [['offer', 'a'], ['close', 'b'], ['ping', null]]);
});

test('the outgoing queue is bounded and sheds routine messages first', () => {
  const { manager } = makeManager({ maxQueue: 3 });
  manager.connect().catch(() => {});
  manager.send('offer', 'a', {});
  for (let i = 0; i < 5; i++) manager.send('ping', null, { id: i });
  FakeWebSocket.last().serverOpens();
  const sent = FakeWebSocket.last().sent;
  assert.equal(sent.length, 3);
  assert.equal(sent[0].type, 'offer');
  assert.deepEqual(sent.slice(1).map((m) => m.payload.id), [3, 4]);
});

test('the backoff is min(1000·2^n, 30000) ms plus up to 20 % jitter', () => {
  const expected = [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000];
  expected.forEach((base, attempt) => {
    assert.equal(WebSocketManager.backoffDelay(attempt, () => 0), base);
    assert.equal(WebSocketManager.backoffDelay(attempt, () => 1), Math.round(base * 1.2));
    for (let i = 0; i < 50; i++) {
      const delay = WebSocketManager.backoffDelay(attempt);
      assert.ok(delay >= base && delay <= base * 1.2, `${delay} outside [${base}, ${base * 1.2}]`);
    }
  });
});

test('a lost socket is reopened on the backoff schedule and every stream renegotiates', async () => {
  const { manager, socket, clock } = await connected({ random: () => 0 });
  const renegotiated = [];
  const events = [];
  manager.registerStream('a', { onReconnect: ({ streamId }) => renegotiated.push(streamId) });
  manager.registerStream('b', { reconnect: ({ streamId }) => renegotiated.push(streamId) });
  for (const name of ['disconnected', 'reconnecting', 'connected', 'reconnected']) {
    manager.on(name, (data) => events.push(name + (name === 'reconnecting' ? ` ${data.delay}` : '')));
  }
  socket.serverDrops();
  assert.equal(manager.reconnecting, true);
  assert.deepEqual(clock.pending(), [1000]);
  clock.advance(1000);
  FakeWebSocket.last().serverDrops(); // the server is still down
  assert.deepEqual(clock.pending(), [2000]);
  clock.advance(2000);
  FakeWebSocket.last().serverDrops();
  assert.deepEqual(clock.pending(), [4000]);
  clock.advance(4000);
  FakeWebSocket.last().serverOpens();
  assert.equal(manager.isConnected(), true);
  assert.equal(manager.reconnecting, false);
  assert.deepEqual(renegotiated, ['a', 'b']);
  assert.deepEqual(events, [
    'disconnected', 'reconnecting 1000', 'reconnecting 2000', 'reconnecting 4000', 'connected', 'reconnected',
  ]);
  assert.equal(FakeWebSocket.instances.length, 4);
  // The schedule starts over after a success.
  FakeWebSocket.last().serverDrops();
  assert.deepEqual(clock.pending(), [1000]);
});

test('messages queued for the lost socket are not replayed on the new one', async () => {
  const { manager, socket, clock } = await connected({ random: () => 0 });
  manager.registerStream('a', { onReconnect: () => manager.send('offer', 'a', { sdp: 'fresh' }) });
  socket.serverDrops();
  manager.send('ice', 'a', { candidate: 'stale' });
  clock.advance(1000);
  FakeWebSocket.last().serverOpens();
  assert.deepEqual(FakeWebSocket.last().sent.map((m) => m.payload.sdp || m.payload.candidate), ['fresh']);
});

test('no reconnect after disconnect(), nor when no stream is left', async () => {
  const { manager, socket, clock } = await connected();
  manager.registerStream('a', {});
  manager.disconnect();
  manager.disconnect(); // idempotent
  assert.deepEqual(clock.pending(), []);
  assert.equal(socket.closedWith.code, 1000);
  const again = await connected();
  again.socket.serverDrops();
  assert.equal(again.manager.reconnecting, false);
  assert.deepEqual(again.clock.pending(), []);
});

test('getMetrics counts messages, measures latency from pings and reports uptime', async () => {
  const { manager, socket, clock } = await connected();
  manager.registerStream('a', {});
  clock.advance(500);
  manager.ping();
  const ping = socket.sent.at(-1);
  assert.equal(ping.type, 'ping');
  clock.advance(40);
  socket.serverSends({ type: 'pong', streamId: null, payload: ping.payload });
  manager.ping();
  clock.advance(20);
  socket.serverSends({ type: 'pong', streamId: null, payload: socket.sent.at(-1).payload });
  socket.serverSends({ type: 'pong', streamId: null, payload: { id: 999 } }); // not ours: ignored
  assert.deepEqual(manager.getMetrics(), {
    messagesSent: 2, messagesReceived: 3, averageLatency: 30, uptime: 560, streamsActive: 1,
    shared: false, sockets: 1, tabs: 1, // Node has no SharedWorker: the page's own socket
  });
  manager.disconnect();
  assert.equal(manager.getMetrics().uptime, 0);
});

test('pings are sent on their interval while connected, and stop after', async () => {
  const { manager, socket, clock } = await connected({ pingInterval: 10000 });
  manager.registerStream('a', {});
  const pings = () => socket.sent.filter((m) => m.type === 'ping').length;
  assert.equal(pings(), 1);
  clock.advance(30000);
  assert.equal(pings(), 4);
  manager.disconnect();
  clock.advance(30000);
  assert.equal(pings(), 4);
});

test('on() returns an unsubscribe function and emit() survives throwing listeners', () => {
  const { manager } = makeManager();
  const seen = [];
  const off = manager.on('custom', (d) => seen.push(d));
  manager.on('custom', () => { throw new Error('boom'); });
  manager.emit('custom', 1);
  off();
  manager.emit('custom', 2);
  assert.deepEqual(seen, [1]);
});

test('log levels: debug is off by default and unknown levels are refused', () => {
  const manager = new WebSocketManager({ url: 'ws://x/ws', WebSocket: FakeWebSocket });
  assert.equal(manager.getLogLevel(), 'warn');
  manager.setLogLevel('debug');
  assert.equal(manager.getLogLevel(), 'debug');
  assert.throws(() => manager.setLogLevel('loud'), /Unknown log level/);
});

test('at debug level the tell-tale lines are logged', async () => {
  const lines = [];
  const original = console.log;
  console.log = (...args) => lines.push(args.join(' '));
  try {
    const { manager } = await connected({ logLevel: 'debug' });
    await manager.connect();
    manager.registerStream('cam-1', {});
  } finally {
    console.log = original;
  }
  const text = lines.join('\n');
  assert.match(text, /WebSocketManager instance [a-z0-9]+ created/);
  assert.match(text, /reusing the existing socket/);
  assert.match(text, /streams managed: 1/);
});

test('whenWelcomed waits for the welcome, or gives up after its timeout', async () => {
  const { manager, socket, clock } = await connected();
  let done = false;
  manager.whenWelcomed(1000).then(() => { done = true; });
  await new Promise((r) => setImmediate(r));
  assert.equal(done, false);
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  await new Promise((r) => setImmediate(r));
  assert.equal(done, true);
  assert.equal(manager.welcomed, true);
  socket.serverDrops();
  assert.equal(manager.welcomed, false); // a new socket gets its own welcome
  let timedOut = false;
  manager.whenWelcomed(1000).then(() => { timedOut = true; });
  clock.advance(1000);
  await new Promise((r) => setImmediate(r));
  assert.equal(timedOut, true);
});

test('backoffDelay is one function, shared: the module export and WebSocketManager.backoffDelay', () => {
  assert.equal(WebSocketManager.backoffDelay, backoffDelay);
  assert.equal(backoffDelay(0, () => 0.5), 1100);
  assert.equal(backoffDelay(40, () => 0), 30000); // capped, however many attempts
});

test('the emitter calls listeners in order, isolates a throwing one and reports it', () => {
  const failures = [];
  const emitter = new MediaStreamEmitter((event, error) => failures.push([event, error.message]));
  const seen = [];
  emitter.on('a', (d) => seen.push(['first', d]));
  emitter.on('a', () => { throw new Error('boom'); });
  emitter.on('a', (d) => seen.push(['third', d]));
  emitter.on('b', (d) => seen.push(['b', d]));
  emitter.emit('a', 1);
  assert.deepEqual(seen, [['first', 1], ['third', 1]]);
  assert.deepEqual(failures, [['a', 'boom']]);
  emitter.emit('nobody-listens', 2); // harmless
});

test('the emitter removes listeners by the returned function or off(), and emits to a snapshot', () => {
  const emitter = new MediaStreamEmitter(() => assert.fail('no listener throws'));
  const seen = [];
  const second = (d) => seen.push(['second', d]);
  const removeFirst = emitter.on('e', (d) => {
    seen.push(['first', d]);
    emitter.on('e', (x) => seen.push(['added during emit', x]));
  });
  emitter.on('e', second);
  emitter.emit('e', 1);
  assert.deepEqual(seen, [['first', 1], ['second', 1]]); // the listener added meanwhile waits
  removeFirst();
  emitter.off('e', second);
  seen.length = 0;
  emitter.emit('e', 2);
  assert.deepEqual(seen, [['added during emit', 2]]);
});

test("the manager's page-wide events go through the shared emitter; globalHandlers is its map", () => {
  const { manager } = makeManager();
  const listener = () => {};
  const off = manager.on('connected', listener);
  assert.ok(manager.globalHandlers.get('connected').has(listener));
  off();
  assert.equal(manager.globalHandlers.get('connected').size, 0);
});

test('registerStream returns what unregisters that registration only', async () => {
  const { manager, socket } = await connected();
  manager.registerStream('keep', {});
  const first = {};
  const unregisterFirst = manager.registerStream('cam', first);
  const second = {};
  const unregisterSecond = manager.registerStream('cam', second); // replaces the first
  unregisterFirst();
  assert.equal(manager.streamHandlers.get('cam'), second);
  assert.equal(socket.sent.filter((m) => m.type === 'close').length, 0);
  unregisterSecond();
  assert.equal(manager.streamHandlers.has('cam'), false);
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'cam' });
  unregisterSecond(); // twice is harmless
  assert.equal(manager.isConnected(), true); // 'keep' is still there
});

test('disconnect() while the socket is opening ends the pending connect() instead of leaving it hanging', async () => {
  const { manager } = makeManager();
  const opening = manager.connect();
  manager.disconnect();
  await assert.rejects(opening, (error) => error.code === 'aborted' && /while the socket was opening/.test(error.message));
  assert.equal(FakeWebSocket.last().closedWith.code, 1000);
});
