// Unit tests of the shared worker's routing (SharedSocketRouter), with real WebSocketManagers
// over fake WebSockets and a fake clock (node --test). The browser side is tests/e2e/test_wall.py.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { WebSocketManager } = require('../../web/static/js/websocket-manager.js');
const { SharedSocketRouter } = require('../../web/static/js/shared-socket-worker.js');
const { FakeWebSocket, FakeClock, flush } = require('./fakes.js');

const SETTINGS = { logLevel: 'silent', pingInterval: 0, maxQueue: 1000 };
const URL = 'ws://server.test/ws';

function makeRouter() {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const warnings = [];
  const router = new SharedSocketRouter({
    createManager: (options) => new WebSocketManager({ ...options, WebSocket: FakeWebSocket, clock, random: () => 0 }),
    warn: (message) => warnings.push(message),
  });
  /** A tab: what it receives, and a way to talk to the worker. */
  const tab = (id) => {
    const inbox = [];
    router.attach(id, (message) => inbox.push(message));
    return {
      id,
      inbox,
      say: (message) => router.receive(id, message),
      messages: (type) => inbox.filter((m) => m.op === 'message' && (!type || m.message.type === type)).map((m) => m.message),
      ops: (op) => inbox.filter((m) => m.op === op),
    };
  };
  return { router, clock, tab, warnings };
}

/** Connect a tab with `streams`, opening any socket it waits for. */
async function connect(tab, streams, { token = null, requestId = 1 } = {}) {
  tab.say({ op: 'connect', requestId, url: URL, token, streams, settings: SETTINGS });
  for (const socket of FakeWebSocket.instances) if (socket.readyState === 0) socket.serverOpens();
  await flush();
  assert.deepEqual(tab.ops('connected').map((m) => m.requestId).slice(-1), [requestId], 'the tab is told it is connected');
}

const offer = (streamId) => ({ type: 'offer', streamId, payload: { sdp: 'v=0\r\n' } });
const sentOn = (socket, type) => socket.sent.filter((m) => m.type === type).map((m) => m.streamId);

test('tabs with different streams share one socket, and each gets only its own messages', async () => {
  const { router, tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a', 'b']);
  await connect(two, ['c']);
  assert.equal(FakeWebSocket.instances.length, 1);
  one.say({ op: 'send', messages: [offer('a'), offer('b')] });
  two.say({ op: 'send', messages: [offer('c')] });
  const socket = FakeWebSocket.last();
  assert.deepEqual(sentOn(socket, 'offer'), ['a', 'b', 'c']);

  socket.serverSends({ type: 'answer', streamId: 'c', payload: 'v=0 c' });
  socket.serverSends({ type: 'answer', streamId: 'a', payload: 'v=0 a' });
  assert.deepEqual(one.messages('answer').map((m) => m.payload), ['v=0 a']);
  assert.deepEqual(two.messages('answer').map((m) => m.payload), ['v=0 c']);
  assert.deepEqual(router.statistics(), { tabs: 2, groups: 1, sockets: 1, streams: 3 });
});

test('two tabs playing the same stream get a socket each, and messages reach the right one', async () => {
  const { router, tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['cam', 'other']);
  await connect(two, ['cam']);
  assert.equal(FakeWebSocket.instances.length, 2, 'the second viewing of "cam" opens a second socket');
  const [first, second] = FakeWebSocket.instances;
  one.say({ op: 'send', messages: [offer('cam')] });
  two.say({ op: 'send', messages: [offer('cam')] });
  assert.deepEqual(sentOn(first, 'offer'), ['cam']);
  assert.deepEqual(sentOn(second, 'offer'), ['cam']);

  second.serverSends({ type: 'answer', streamId: 'cam', payload: 'for two' });
  first.serverSends({ type: 'answer', streamId: 'cam', payload: 'for one' });
  assert.deepEqual(one.messages('answer').map((m) => m.payload), ['for one']);
  assert.deepEqual(two.messages('answer').map((m) => m.payload), ['for two']);

  // A third tab with a new stream goes on the first socket: a lane opens only for duplicates.
  const three = tab('three');
  await connect(three, ['new']);
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.deepEqual(router.statistics().sockets, 2);
});

test('a tab that is gone has its sessions closed; the others play on, and the last socket closes', async () => {
  const { router, tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a', 'b']);
  await connect(two, ['c']);
  const socket = FakeWebSocket.last();

  router.forget('one');
  assert.deepEqual(sentOn(socket, 'close').sort(), ['a', 'b']);
  assert.equal(socket.readyState, 1, 'tab two still plays');
  socket.serverSends({ type: 'state', streamId: 'c', payload: { state: 'live' } });
  assert.equal(two.messages('state').length, 1);

  router.forget('two');
  assert.deepEqual(sentOn(socket, 'close').sort(), ['a', 'b', 'c']);
  assert.equal(socket.readyState, 3);
  assert.deepEqual(router.statistics(), { tabs: 0, groups: 0, sockets: 0, streams: 0 });
});

test('a tab that unregisters a duplicate frees its lane, and the socket closes', async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['cam']);
  await connect(two, ['cam']);
  const [first, second] = FakeWebSocket.instances;
  two.say({ op: 'unregister', streamId: 'cam' });
  assert.deepEqual(sentOn(second, 'close'), ['cam']);
  assert.equal(second.readyState, 3);
  assert.equal(first.readyState, 1);
  assert.deepEqual(sentOn(first, 'close'), []);
});

test('after the socket comes back, every tab is told and each stream renegotiates in its own tab', async () => {
  const { tab, clock } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a']);
  await connect(two, ['b']);
  FakeWebSocket.last().serverDrops(1006);
  for (const t of [one, two]) {
    const [event] = t.ops('event').filter((m) => m.name === 'disconnected');
    assert.deepEqual(event.data, { code: 1006, reason: '', willReconnect: true });
    assert.equal(event.connected, false);
  }
  clock.advance(1000); // the first retry: 1000 ms (jitter 0)
  assert.equal(FakeWebSocket.instances.length, 2);
  FakeWebSocket.last().serverOpens();
  assert.deepEqual(one.ops('reconnect').map((m) => m.streamId), ['a']);
  assert.deepEqual(two.ops('reconnect').map((m) => m.streamId), ['b']);
  for (const t of [one, two]) {
    const connected = t.ops('event').filter((m) => m.name === 'connected');
    assert.equal(connected.length, 2, 'told once at first, once again after the reconnect');
    assert.equal(connected[1].connected, true);
  }
});

test('the welcome reaches tabs that join a socket already welcomed', async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  await connect(one, ['a']);
  FakeWebSocket.last().serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [{ urls: 'stun:x' }] } });
  assert.equal(one.ops('welcome').length, 1);
  const two = tab('two');
  await connect(two, ['b']);
  assert.deepEqual(two.ops('welcome').map((m) => m.serverInfo.iceServers[0].urls), ['stun:x']);
});

test('fallback video reaches only the tab that asked for it', async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a']);
  await connect(two, ['b']);
  const id = new TextEncoder().encode('b');
  const frame = new Uint8Array([0x12, 0, id.length, ...id, 9, 8, 7]);
  FakeWebSocket.last().onmessage({ data: frame.buffer });
  assert.equal(one.ops('media').length, 0);
  const [media] = two.ops('media');
  assert.equal(media.segment.kind, 'fragment');
  assert.deepEqual([...media.segment.data], [9, 8, 7]);
});

test('tabs with different tokens never share a socket', async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a'], { token: 'grant-a' });
  await connect(two, ['b'], { token: 'grant-b' });
  assert.deepEqual(FakeWebSocket.instances.map((s) => s.url), [`${URL}?token=grant-a`, `${URL}?token=grant-b`]);
});

test("a token refresh of a group's only tab keeps the socket and is used at its next reconnect", async () => {
  const { tab, clock } = makeRouter();
  const one = tab('one');
  await connect(one, ['a'], { token: 'old' });
  one.say({ op: 'configure', url: URL, token: 'new' });
  assert.equal(FakeWebSocket.instances.length, 1);
  FakeWebSocket.last().serverDrops(1006);
  clock.advance(1000);
  assert.equal(FakeWebSocket.last().url, `${URL}?token=new`);
});

test("a tab's new token moves its next offers to a socket of its own when others share the old one", async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a'], { token: 'old' });
  await connect(two, ['b'], { token: 'old' });
  const shared = FakeWebSocket.last();
  one.say({ op: 'configure', url: URL, token: 'new' });
  one.say({ op: 'send', messages: [offer('a')] });
  assert.deepEqual(sentOn(shared, 'close'), ['a'], 'the old session ends');
  const moved = FakeWebSocket.last();
  assert.equal(moved.url, `${URL}?token=new`);
  moved.serverOpens();
  assert.deepEqual(sentOn(moved, 'offer'), ['a']);
  assert.equal(shared.readyState, 1, 'tab two plays on');
});

test('pings go to the sockets, and each tab gets its figures when they change', async () => {
  const { router, tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a']);
  await connect(two, ['b']);
  one.say({ op: 'send', messages: [{ type: 'ping', streamId: null, payload: {} }] });
  assert.equal(FakeWebSocket.last().sent.filter((m) => m.type === 'ping').length, 1);
  router.publishMetrics();
  const [metrics] = one.ops('metrics');
  assert.equal(metrics.metrics.sockets, 1);
  assert.equal(metrics.metrics.tabs, 2);
  assert.equal(metrics.metrics.messagesSent, 1);
  router.publishMetrics();
  assert.equal(one.ops('metrics').length, 1, 'unchanged figures are not sent again');
});

test('a socket a tab is still connecting on stays open when another tab leaves it', async () => {
  const { tab } = makeRouter();
  const one = tab('one');
  const two = tab('two');
  await connect(one, ['a']);
  const socket = FakeWebSocket.last();
  socket.serverDrops(1006); // the socket is being reopened when tab two connects, with no streams yet
  two.say({ op: 'connect', requestId: 7, url: URL, token: null, streams: [], settings: SETTINGS });
  one.say({ op: 'unregister', streamId: 'a' });
  await flush();
  FakeWebSocket.last().serverOpens();
  await flush();
  assert.deepEqual(two.ops('connected').map((m) => m.requestId), [7], 'tab two is connected, not left waiting');
  assert.equal(FakeWebSocket.last().readyState, 1);
  assert.deepEqual(two.ops('connectFailed'), []);
});

test('a message from a tab that never said hello is dropped with a warning', () => {
  const { router, warnings } = makeRouter();
  router.receive('ghost', { op: 'register', streamId: 'a' });
  assert.match(warnings[0], /tab ghost/);
  assert.equal(FakeWebSocket.instances.length, 0);
});

// --- pages and worker together: WebSocketManager({shared: true}) over a MessageChannel -------

const { serveTab } = require('../../web/static/js/shared-socket-worker.js');
const { FakeLocks } = require('./fakes.js');

/** One browser: its Web Locks, its shared worker (which can die), and tabs to open. */
function makeBrowser() {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const locks = new FakeLocks();
  const ports = [];
  let generation = 0;
  const startWorker = () => {
    const workerLock = `mediastream-worker-${++generation}`;
    const router = new SharedSocketRouter({
      createManager: (options) => new WebSocketManager({ ...options, WebSocket: FakeWebSocket, clock, random: () => 0 }),
      warn: () => {},
    });
    const holding = new Promise((held) => {
      locks.request(workerLock, () => {
        held();
        return new Promise(() => {});
      });
    });
    return { router, workerLock, holding };
  };
  const browser = { worker: startWorker(), locks, clock, created: [] };
  class FakeSharedWorker {
    constructor(url, options) {
      browser.created.push({ url, name: options.name });
      const channel = new MessageChannel();
      ports.push(channel.port1, channel.port2);
      this.port = channel.port1;
      this.onerror = null;
      const { router, workerLock, holding } = browser.worker;
      serveTab(router, channel.port2, { locks, workerLock, holding, protocol: WebSocketManager.sharedProtocol });
    }
  }
  browser.tab = (options = {}) => new WebSocketManager({
    url: URL, logLevel: 'silent', pingInterval: 0, SharedWorker: FakeSharedWorker, locks,
    workerUrl: 'http://cams.test/static/js/shared-socket-worker.js?v=abc', ...options,
  });
  browser.killWorker = () => {
    const dead = browser.worker;
    browser.worker = startWorker();
    locks.kill(dead.workerLock);
  };
  browser.close = () => ports.forEach((port) => port.close());
  return browser;
}

/** Wait for messages to cross the ports (each hop is a macrotask). */
async function until(condition, what = 'condition') {
  for (let i = 0; i < 200; i++) {
    if (condition()) return;
    await new Promise((resolve) => setImmediate(resolve));
  }
  assert.fail(`${what} never held`);
}

async function connectTab(manager) {
  const connecting = manager.connect();
  await until(() => FakeWebSocket.instances.some((s) => s.readyState === 0) || manager.connected, 'a socket to open');
  for (const socket of FakeWebSocket.instances) if (socket.readyState === 0) socket.serverOpens();
  await connecting;
}

test('two pages with shared: true signal through one socket, each getting its own answers', async () => {
  const browser = makeBrowser();
  try {
    const one = browser.tab();
    const two = browser.tab();
    const answers = { one: [], two: [] };
    one.registerStream('a', { answer: (sdp) => answers.one.push(sdp) });
    two.registerStream('b', { answer: (sdp) => answers.two.push(sdp) });
    await connectTab(one);
    await connectTab(two);
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.ok(one.isConnected() && two.isConnected());
    assert.deepEqual(browser.created.map((w) => w.url), Array(2).fill('http://cams.test/static/js/shared-socket-worker.js?v=abc'));
    assert.equal(one.ws, null, 'the socket is the worker\'s');

    const socket = FakeWebSocket.last();
    one.send('offer', 'a', { sdp: 'v=0' });
    two.send('offer', 'b', { sdp: 'v=0' });
    await until(() => socket.sent.filter((m) => m.type === 'offer').length === 2, 'both offers sent');
    socket.serverSends({ type: 'answer', streamId: 'b', payload: 'answer b' });
    socket.serverSends({ type: 'answer', streamId: 'a', payload: 'answer a' });
    await until(() => answers.one.length && answers.two.length, 'both answers routed');
    assert.deepEqual(answers, { one: ['answer a'], two: ['answer b'] });

    browser.worker.router.publishMetrics();
    await until(() => one.getMetrics().tabs === 2, 'the worker\'s figures');
    assert.deepEqual(
      { ...one.getMetrics(), uptime: 0 },
      { messagesSent: 2, messagesReceived: 2, averageLatency: null, uptime: 0, streamsActive: 1, shared: true, sockets: 1, tabs: 2 },
    );
  } finally {
    browser.close();
  }
});

test('a page that is gone (its lock let go) has its sessions closed; the other page plays on', async () => {
  const browser = makeBrowser();
  try {
    const one = browser.tab();
    const two = browser.tab();
    one.registerStream('a', {});
    await connectTab(one);
    two.registerStream('b', {});
    await connectTab(two);
    const socket = FakeWebSocket.last();
    const [firstTabLock] = [...browser.locks.holders.keys()].filter((name) => name.startsWith('mediastream-tab-'));
    browser.locks.kill(firstTabLock);
    await until(() => socket.sent.some((m) => m.type === 'close'), 'a close');
    assert.deepEqual(socket.sent.filter((m) => m.type === 'close').map((m) => m.streamId), ['a']);
    assert.equal(socket.readyState, 1);
    assert.ok(two.isConnected());
  } finally {
    browser.close();
  }
});

test('when the worker dies, each page starts another and renegotiates its streams', async () => {
  const browser = makeBrowser();
  try {
    const page = browser.tab();
    const renegotiated = [];
    const events = [];
    page.on('disconnected', (e) => events.push(['disconnected', e.willReconnect]));
    page.on('reconnected', () => events.push(['reconnected']));
    page.registerStream('a', { onReconnect: ({ streamId }) => renegotiated.push(streamId) });
    await connectTab(page);
    browser.killWorker();
    await until(() => FakeWebSocket.instances.length === 2, 'a socket from the new worker');
    FakeWebSocket.last().serverOpens();
    await until(() => renegotiated.length === 1, 'the renegotiation');
    assert.deepEqual(renegotiated, ['a']);
    assert.deepEqual(events, [['disconnected', true], ['reconnected']]);
    assert.equal(browser.created.length, 2);
    assert.ok(page.isConnected());
  } finally {
    browser.close();
  }
});

test('a page whose shared worker cannot start opens its own socket, with the same API', async () => {
  FakeWebSocket.reset();
  class BrokenSharedWorker {
    constructor() {
      throw new Error('SecurityError: the script is on another origin');
    }
  }
  const page = new WebSocketManager({
    url: URL, logLevel: 'silent', pingInterval: 0, WebSocket: FakeWebSocket,
    SharedWorker: BrokenSharedWorker, locks: new FakeLocks(),
  });
  page.registerStream('a', {});
  const connecting = page.connect();
  await until(() => FakeWebSocket.instances.length === 1, 'its own socket');
  FakeWebSocket.last().serverOpens();
  await connecting;
  assert.equal(page.ws, FakeWebSocket.last());
  assert.equal(page.getMetrics().shared, false);
  page.disconnect();
});

test('shared: false keeps the page on its own socket even where it could share', async () => {
  FakeWebSocket.reset();
  let started = 0;
  class CountingSharedWorker {
    constructor() {
      started += 1;
    }
  }
  const page = new WebSocketManager({
    url: URL, logLevel: 'silent', pingInterval: 0, WebSocket: FakeWebSocket,
    SharedWorker: CountingSharedWorker, locks: new FakeLocks(), shared: false,
  });
  const connecting = page.connect();
  FakeWebSocket.last().serverOpens();
  await connecting;
  assert.equal(started, 0);
  assert.equal(page.getMetrics().shared, false);
  page.disconnect();
});

test('?mediastreamShared=0 on the page keeps it on its own socket without code', async () => {
  FakeWebSocket.reset();
  globalThis.location = { protocol: 'http:', host: 'cams.test', origin: 'http://cams.test', search: '?mediastreamShared=0' };
  try {
    let started = 0;
    class CountingSharedWorker {
      constructor() {
        started += 1;
      }
    }
    const page = new WebSocketManager({
      url: URL, logLevel: 'silent', pingInterval: 0, WebSocket: FakeWebSocket,
      SharedWorker: CountingSharedWorker, locks: new FakeLocks(),
    });
    const connecting = page.connect();
    FakeWebSocket.last().serverOpens();
    await connecting;
    assert.equal(started, 0);
    assert.equal(page.getMetrics().shared, false);
    page.disconnect();
  } finally {
    delete globalThis.location;
  }
});
