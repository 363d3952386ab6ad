// Per-tile quality in WebRTCEngine: what it tells the server about its tile, and when
// (node --test; fake socket, peer connection, clock and observers).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { WebSocketManager } = require('../../web/static/js/websocket-manager.js');
const { WebRTCEngine } = require('../../web/static/js/webrtc-engine.js');
const { FakeWebSocket, FakeClock, FakePeerConnection, flush } = require('./fakes.js');

/** An observer the test drives: `fire(entries)` calls back as the browser would. */
function fakeObserver() {
  return class FakeObserver {
    static instances = [];
    constructor(callback) {
      this.callback = callback;
      this.observed = [];
      this.disconnected = false;
      FakeObserver.instances.push(this);
    }
    observe(element) { this.observed.push(element); }
    disconnect() { this.disconnected = true; }
    fire(entries = [{}]) { this.callback(entries, this); }
  };
}

async function setup(size = { width: 320, height: 180 }, ratio = 2) {
  FakeWebSocket.reset();
  FakePeerConnection.reset();
  globalThis.devicePixelRatio = ratio;
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
  });
  const rect = { ...size };
  const video = { srcObject: null, play: () => Promise.resolve(), getBoundingClientRect: () => ({ ...rect }) };
  const Resize = fakeObserver();
  const Intersection = fakeObserver();
  const engine = new WebRTCEngine({
    streamId: 'gate', videoElement: video, manager, RTCPeerConnection: FakePeerConnection, timers: clock,
    statsInterval: 0, fallback: 'never', ResizeObserver: Resize, IntersectionObserver: Intersection,
  });
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  await flush();
  await flush();
  const offer = socket.sent.find((m) => m.type === 'offer');
  socket.serverSends({ type: 'answer', streamId: 'gate', payload: 'v=0 answer', sessionId: offer.payload.sessionId });
  await connecting;
  const qualityMessages = () => socket.sent.filter((m) => m.type === 'quality');
  return { engine, socket, offer, clock, rect, Resize, Intersection, qualityMessages };
}

test('the offer says auto and the tile in device pixels', async () => {
  const { offer } = await setup({ width: 320, height: 180 }, 2);
  assert.equal(offer.payload.quality, 'auto');
  assert.deepEqual(offer.payload.tile, { width: 640, height: 360, visible: true });
});

test('a resize is told at once, then at most every 200 ms, and only when the tile changed', async () => {
  const { Resize, clock, rect, qualityMessages, offer } = await setup();
  const resize = Resize.instances[0];
  rect.width = 960; rect.height = 540;
  resize.fire(); // made full screen: told at once
  const [told] = qualityMessages();
  assert.deepEqual(told.payload, { tile: { width: 1920, height: 1080, visible: true }, sessionId: offer.payload.sessionId });
  rect.width = 1000;
  resize.fire(); // still resizing: told when the 200 ms are over
  rect.width = 1010;
  resize.fire();
  clock.advance(150);
  assert.equal(qualityMessages().length, 1);
  clock.advance(100);
  assert.equal(qualityMessages().length, 2);
  assert.equal(qualityMessages()[1].payload.tile.width, 2020);
  clock.advance(1000);
  resize.fire();
  clock.advance(1000);
  assert.equal(qualityMessages().length, 2); // the same size again: nothing to tell
});

test('a tile scrolled out of view is told as not visible', async () => {
  const { Intersection, clock, qualityMessages } = await setup();
  Intersection.instances[0].fire([{ isIntersecting: false }]);
  assert.equal(qualityMessages().at(-1).payload.tile.visible, false);
});

test('setQuality pins a quality on the same session, with no new offer', async () => {
  const { engine, socket, qualityMessages, offer } = await setup();
  engine.setQuality('main');
  assert.equal(engine.requestedQuality, 'main');
  const [told] = qualityMessages();
  assert.equal(told.payload.quality, 'main');
  assert.equal(told.payload.sessionId, offer.payload.sessionId);
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 1);
  assert.throws(() => engine.setQuality(''), /quality/);
});

test('the quality the server plays is the engine\'s quality and a quality event', async () => {
  const { engine, socket, offer } = await setup();
  const seen = [];
  engine.on('quality', (info) => seen.push(info));
  assert.equal(engine.quality, null);
  socket.serverSends({
    type: 'quality', streamId: 'gate', sessionId: offer.payload.sessionId,
    payload: { quality: 'sub', requested: 'auto', reason: 'tile', qualities: [{ name: 'main', width: 1920, height: 1080 }, { name: 'sub', width: 640, height: 360 }] },
  });
  socket.serverSends({ type: 'quality', streamId: 'gate', sessionId: 'an-old-session', payload: { quality: 'main' } });
  assert.equal(engine.quality, 'sub');
  assert.equal(seen.length, 1);
  assert.equal(seen[0].reason, 'tile');
  assert.equal(seen[0].qualities.length, 2);
});

test('disconnect stops following the tile', async () => {
  const { engine, Resize, Intersection, clock, qualityMessages, rect } = await setup();
  engine.disconnect();
  rect.width = 1000;
  Resize.instances[0].fire();
  clock.advance(1000);
  assert.equal(qualityMessages().length, 0);
  assert.ok(Resize.instances[0].disconnected && Intersection.instances[0].disconnected);
});

test('a quality the stream does not have: refused before sending once the qualities are known, else the server\'s refusal leaves the stream playing', async () => {
  const { engine, socket, offer, clock, qualityMessages } = await setup();
  const errors = [];
  engine.on('error', (e) => errors.push([e.code, e.recoverable]));
  engine.setQuality('ultra'); // the qualities are not known yet: asked
  assert.equal(qualityMessages().at(-1).payload.quality, 'ultra');
  socket.serverSends({ type: 'error', streamId: 'gate', payload: 'Stream "gate" has no quality "ultra"; it has main, sub (or "auto")', code: 'unknown_quality' });
  assert.deepEqual(errors, [['unknown_quality', false]]);
  assert.equal(engine.requestedQuality, 'auto'); // what the server still plays for it
  clock.advance(60000);
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 1); // no renegotiation
  assert.equal(engine.state, 'connecting'); // as it was (the fake peer never connected)

  socket.serverSends({
    type: 'quality', streamId: 'gate', sessionId: offer.payload.sessionId,
    payload: { quality: 'sub', requested: 'auto', reason: 'tile', qualities: [{ name: 'main', width: 1920, height: 1080 }, { name: 'sub', width: 640, height: 360 }] },
  });
  const sent = qualityMessages().length;
  assert.throws(() => engine.setQuality('ultra'), /stream "gate" has no quality "ultra"; it has main, sub/);
  assert.equal(qualityMessages().length, sent);
  assert.equal(engine.requestedQuality, 'auto');
  engine.setQuality('main');
  assert.equal(qualityMessages().at(-1).payload.quality, 'main');
});
