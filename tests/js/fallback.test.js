// Video over the socket (fallback): the binary framing, its routing to the stream, and what the
// engine reads of the server's fMP4 (node --test). The fMP4 fixtures were written by the
// server's own remuxer (src/mediastream/media/fmp4.py) from libx264 frames, and from FFmpeg's
// Opus and AAC encoders for the audio ones (tests/unit/test_fmp4.py, encoded_audio).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { WebSocketManager } = require('../../web/static/js/websocket-manager.js');
const { codecOfInit, isKeyFragment } = require('../../web/static/js/webrtc-engine.js');
const { FakeWebSocket } = require('./fakes.js');

const fixture = (name) => new Uint8Array(fs.readFileSync(path.join(__dirname, 'fixtures', name)));
const parse = WebSocketManager.parseMediaMessage;

/** A binary message as the server frames it (src/mediastream/fallback.py frame_binary). */
function framed(kind, streamId, payload) {
  const name = new TextEncoder().encode(streamId);
  const message = new Uint8Array(3 + name.length + payload.length);
  message[0] = (1 << 4) | kind;
  message[1] = name.length >> 8;
  message[2] = name.length & 0xff;
  message.set(name, 3);
  message.set(payload, 3 + name.length);
  return message.buffer;
}

test('a binary message is read into its kind, stream id and payload', () => {
  const init = parse(framed(1, 'cam-é', new Uint8Array([1, 2, 3])));
  assert.equal(init.kind, 'init');
  assert.equal(init.streamId, 'cam-é');
  assert.deepEqual([...init.data], [1, 2, 3]);
  const fragment = parse(framed(2, 'x', new Uint8Array(0)));
  assert.equal(fragment.kind, 'fragment');
  assert.equal(fragment.data.length, 0);
});

test('a malformed binary message is refused, naming what is wrong', () => {
  assert.throws(() => parse(new Uint8Array([0x11, 0]).buffer), /shorter than its header/);
  assert.throws(() => parse(new Uint8Array([0x21, 0, 0]).buffer), /version 2; expected 1/);
  assert.throws(() => parse(new Uint8Array([0x13, 0, 0]).buffer), /unknown kind 3/);
  assert.throws(() => parse(new Uint8Array([0x11, 0, 9, 97]).buffer), /overruns the message/);
});

test('binary messages go to their own stream\'s onMedia; bad or unclaimed ones are dropped', async () => {
  FakeWebSocket.reset();
  const manager = new WebSocketManager({ url: 'ws://server.test/ws', WebSocket: FakeWebSocket, pingInterval: 0, logLevel: 'silent' });
  const a = [];
  const b = [];
  manager.registerStream('cam-a', { onMedia: (segment) => a.push(segment) });
  manager.registerStream('cam-b', { onMedia: (segment) => b.push(segment) });
  const opening = manager.connect();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  await opening;
  assert.equal(socket.binaryType, 'arraybuffer');
  socket.onmessage({ data: framed(1, 'cam-a', new Uint8Array([7])) });
  socket.onmessage({ data: framed(2, 'cam-b', new Uint8Array([8])) });
  socket.onmessage({ data: framed(2, 'cam-a', new Uint8Array([9])) });
  socket.onmessage({ data: new Uint8Array([0xff]).buffer }); // malformed: ignored
  socket.onmessage({ data: framed(2, 'nobody', new Uint8Array([1])) }); // unclaimed: ignored
  socket.serverSends({ type: 'state', streamId: 'cam-a', payload: { state: 'live' } }); // text still works
  assert.deepEqual(a.map((s) => [s.kind, [...s.data]]), [['init', [7]], ['fragment', [9]]]);
  assert.deepEqual(b.map((s) => [s.kind, [...s.data]]), [['fragment', [8]]]);
  manager.disconnect();
});

test('the codec string comes from the init segment\'s avcC', () => {
  assert.equal(codecOfInit(fixture('fallback-init.mp4')), 'avc1.42c00c');
  assert.equal(codecOfInit(new Uint8Array([0, 0, 0, 8, 0x66, 0x74, 0x79, 0x70])), null);
});

test('a fragment that starts with a keyframe is told from one that does not', () => {
  assert.equal(isKeyFragment(fixture('fallback-keyframe.m4s')), true);
  assert.equal(isKeyFragment(fixture('fallback-delta.m4s')), false);
  assert.equal(isKeyFragment(new Uint8Array(16)), false); // no trun at all
});

test('in a message of several fragments, its first video fragment decides; sound alone is no keyframe', () => {
  const join = (...names) => {
    const parts = names.map(fixture);
    const joined = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const part of parts) { joined.set(part, at); at += part.length; }
    return joined;
  };
  assert.equal(isKeyFragment(join('fallback-audio.m4s', 'fallback-keyframe.m4s')), true);
  assert.equal(isKeyFragment(join('fallback-audio.m4s', 'fallback-delta.m4s', 'fallback-keyframe.m4s')), false);
  assert.equal(isKeyFragment(fixture('fallback-audio.m4s')), false); // a sync sample, but sound
});

// --- the engine's fallback, with a fake MediaSource -------------------------------------------

const { WebRTCEngine } = require('../../web/static/js/webrtc-engine.js');
const { FakeClock, FakePeerConnection, flush } = require('./fakes.js');

class FakeSourceBuffer {
  constructor(type, video) {
    this.type = type;
    this.video = video;
    this.mode = 'sequence';
    this.updating = false;
    this.appended = [];
    this.removed = [];
    this.listeners = {};
  }
  addEventListener(name, fn) { this.listeners[name] = fn; }
  appendBuffer(data) {
    this.updating = true;
    this.appended.push(data);
  }
  remove(start, end) {
    this.updating = true;
    this.removed.push([start, end]);
  }
  /** The browser finished the append: `bufferedTo` seconds are now buffered from 1000 s on. */
  finish(bufferedTo) {
    this.updating = false;
    if (bufferedTo !== undefined) this.video.bufferedRange = [1000, bufferedTo];
    this.listeners.updateend && this.listeners.updateend();
  }
}

function fakeMediaSource(video) {
  return class FakeMediaSource {
    static last = null;
    constructor() {
      this.readyState = 'closed';
      this.buffers = [];
      this.listeners = {};
      FakeMediaSource.last = this;
    }
    addEventListener(name, fn) { this.listeners[name] = fn; }
    addSourceBuffer(type) {
      const buffer = new FakeSourceBuffer(type, video);
      this.buffers.push(buffer);
      return buffer;
    }
    endOfStream() { this.readyState = 'ended'; }
    open() {
      this.readyState = 'open';
      this.listeners.sourceopen && this.listeners.sourceopen();
    }
  };
}

function fakeVideo() {
  return {
    srcObject: null,
    src: '',
    currentTime: 0,
    bufferedRange: null,
    played: 0,
    get buffered() {
      const range = this.bufferedRange;
      return { length: range ? 1 : 0, start: () => range[0], end: () => range[1] };
    },
    play() { this.played += 1; return Promise.resolve(); },
    removeAttribute(name) { if (name === 'src') this.src = ''; },
    load() {},
  };
}

async function fallbackSetup(extra = {}) {
  FakeWebSocket.reset();
  FakePeerConnection.reset();
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
  });
  const video = fakeVideo();
  const MediaSource = fakeMediaSource(video);
  const engine = new WebRTCEngine({
    streamId: 'cam', videoElement: video, manager, RTCPeerConnection: FakePeerConnection, timers: clock,
    MediaSource, ...extra,
  });
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  await flush();
  await flush();
  const offer = socket.sent.filter((m) => m.type === 'offer').at(-1);
  if (offer) socket.serverSends({ type: 'answer', streamId: 'cam', payload: 'v=0 answer', sessionId: offer.payload.sessionId });
  await connecting;
  return { clock, video, MediaSource, engine, socket };
}

const originalCreateObjectURL = URL.createObjectURL;
const originalRevokeObjectURL = URL.revokeObjectURL;
test.before(() => {
  URL.createObjectURL = () => 'blob:fake-media-source';
  URL.revokeObjectURL = () => {};
});
test.after(() => {
  URL.createObjectURL = originalCreateObjectURL;
  URL.revokeObjectURL = originalRevokeObjectURL;
});

test('a peer connection that fails to connect falls back to video over the socket', async () => {
  const { video, MediaSource, engine, socket } = await fallbackSetup();
  const pc = FakePeerConnection.last();
  pc.becomes('failed');
  assert.ok(pc.closed);
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { quality: 'auto' } });
  assert.equal(engine.transport, 'fallback');
  assert.equal(engine.state, 'connecting');
  assert.equal(video.src, 'blob:fake-media-source');

  const states = [];
  engine.on('state', (s) => states.push([s.state, s.detail]));
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init.mp4')) });
  const [buffer] = MediaSource.last.buffers;
  assert.equal(buffer.type, 'video/mp4; codecs="avc1.42c00c"');
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-keyframe.m4s')) }); // queued: busy
  assert.equal(buffer.appended.length, 1);
  buffer.finish();
  assert.equal(buffer.appended.length, 2);
  buffer.finish(1000.04);
  assert.deepEqual(states, [['live', 'fallback']]);
  assert.equal(video.played, 1);
  assert.equal(video.currentTime, 1000); // moved to where the media starts
  engine.disconnect();
});

test('the playhead jumps to the live edge when more than a second behind', async () => {
  const { video, MediaSource, engine, socket } = await fallbackSetup({ fallback: 'always' });
  assert.deepEqual(socket.sent.filter((m) => m.type === 'offer'), []); // never tried WebRTC
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init.mp4')) });
  const [buffer] = MediaSource.last.buffers;
  buffer.finish();
  video.currentTime = 1000.5;
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-keyframe.m4s')) });
  buffer.finish(1001.2); // 0.7 s behind: left alone
  assert.equal(video.currentTime, 1000.5);
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-delta.m4s')) });
  buffer.finish(1002); // 1.5 s behind: jump
  assert.ok(Math.abs(video.currentTime - 1001.85) < 1e-9, String(video.currentTime));
  engine.disconnect();
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'cam' });
  assert.equal(video.src, '');
});

test('an overflowing queue skips to the next keyframe fragment', async () => {
  const { MediaSource, engine, socket } = await fallbackSetup({ fallback: 'always' });
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init.mp4')) });
  const [buffer] = MediaSource.last.buffers; // busy with the init: everything else queues
  for (let i = 0; i < 61; i++) socket.onmessage({ data: framed(2, 'cam', fixture('fallback-delta.m4s')) });
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-delta.m4s')) }); // mid-GOP: skipped
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-keyframe.m4s')) });
  assert.deepEqual(engine.getFallbackStats(), { appended: 0, skipped: 62, codecs: 'avc1.42c00c', webrtcAttempts: 0 });
  buffer.finish();
  assert.deepEqual([...buffer.appended.at(-1)], [...fixture('fallback-keyframe.m4s')]);
  engine.disconnect();
});

test('a peer that never connects falls back after fallbackAfterMs; reconnect() tries WebRTC again', async () => {
  const { clock, engine, socket } = await fallbackSetup({ fallbackAfterMs: 3000 });
  clock.advance(2999);
  assert.equal(engine.transport, 'webrtc');
  clock.advance(1);
  assert.equal(engine.transport, 'fallback');
  const offers = socket.sent.filter((m) => m.type === 'offer').length;
  engine.reconnect();
  await flush();
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, offers + 1);
  assert.equal(engine.transport, 'webrtc');
  engine.disconnect();
});

test('fallback "never" keeps to WebRTC: a failed peer is renegotiated', async () => {
  const { clock, engine, socket } = await fallbackSetup({ fallback: 'never' });
  FakePeerConnection.last().becomes('failed');
  clock.advance(60000);
  await flush();
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'fallback').length, 0);
  assert.equal(engine.transport, 'webrtc');
  assert.ok(socket.sent.filter((m) => m.type === 'offer').length >= 2);
  engine.disconnect();
});

test('setFallback switches a playing stream to the socket and back to WebRTC', async () => {
  const { engine, socket } = await fallbackSetup();
  FakePeerConnection.last().becomes('connected');
  assert.equal(engine.state, 'live');
  engine.setFallback('always');
  await flush();
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { quality: 'auto' } });
  assert.equal(engine.transport, 'fallback');
  assert.ok(FakePeerConnection.last().closed);
  const offers = socket.sent.filter((m) => m.type === 'offer').length;
  engine.setFallback('auto');
  await flush();
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, offers + 1);
  assert.equal(engine.transport, 'webrtc');
  engine.disconnect();
});

test('an answer that never comes falls back, and the abandoned offer does not undo it', async () => {
  FakeWebSocket.reset();
  FakePeerConnection.reset();
  const clock = new FakeClock();
  const manager = new WebSocketManager({
    url: 'ws://server.test/ws', WebSocket: FakeWebSocket, clock, pingInterval: 0, logLevel: 'silent',
  });
  const video = fakeVideo();
  const errors = [];
  const engine = new WebRTCEngine({
    streamId: 'cam', videoElement: video, manager, RTCPeerConnection: FakePeerConnection, timers: clock,
    MediaSource: fakeMediaSource(video), fallbackAfterMs: 2000,
  });
  engine.on('error', (e) => errors.push(e));
  const connecting = engine.connect();
  await flush();
  const socket = FakeWebSocket.last();
  socket.serverOpens();
  socket.serverSends({ type: 'welcome', streamId: null, payload: { iceServers: [] } });
  await flush();
  await flush();
  clock.advance(2000); // no answer yet
  await connecting;
  assert.equal(engine.transport, 'fallback');
  clock.advance(120000); // no retry timer may renegotiate it away
  await flush();
  assert.equal(engine.transport, 'fallback');
  assert.deepEqual(errors, []);
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 1);
  engine.disconnect();
});

// --- audio in the fallback ---------------------------------------------------------------------

test('the audio codec string comes from the init segment\'s dOps or esds', () => {
  const { audioCodecOfInit } = require('../../web/static/js/webrtc-engine.js');
  assert.equal(audioCodecOfInit(fixture('fallback-init-opus.mp4')), 'opus');
  assert.equal(audioCodecOfInit(fixture('fallback-init-aac.mp4')), 'mp4a.40.2');
  assert.equal(audioCodecOfInit(fixture('fallback-init.mp4')), null);
});

/** A fake MediaSource class that takes only the types `accepts` says yes to. */
function choosyMediaSource(video, accepts) {
  const MediaSource = fakeMediaSource(video);
  MediaSource.asked = [];
  MediaSource.isTypeSupported = (type) => {
    MediaSource.asked.push(type);
    return accepts(type);
  };
  return MediaSource;
}

test('with audio, the engine asks for the codecs MSE takes and opens one SourceBuffer for both', async () => {
  const video = fakeVideo();
  const MediaSource = choosyMediaSource(video, (type) => !type.includes('mp4a'));
  const { engine, socket } = await fallbackSetup({ fallback: 'always', audio: true, MediaSource, videoElement: video });
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { audio: ['opus'], quality: 'auto' } });
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init-opus.mp4')) });
  const [buffer] = MediaSource.last.buffers;
  assert.equal(buffer.type, 'video/mp4; codecs="avc1.42c00c,opus"');
  assert.equal(engine.getFallbackStats()?.codecs, 'avc1.42c00c,opus');
  engine.disconnect();
});

test('an init whose audio the browser refuses is dropped and video only is asked for', async () => {
  const video = fakeVideo();
  const MediaSource = choosyMediaSource(video, (type) => !type.includes('mp4a.40.2"'));
  // The probe (avc1.42e01e,mp4a.40.2) is refused, so only Opus is asked for; a server that
  // sends AAC anyway (another codec variant, say) gets a request for video only.
  const { engine, socket } = await fallbackSetup({ fallback: 'always', audio: true, MediaSource, videoElement: video });
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init-aac.mp4')) });
  assert.deepEqual(MediaSource.last.buffers, []);
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { audio: [], quality: 'auto' } });
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-keyframe.m4s')) }); // the old session's
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init.mp4')) }); // video only
  const [buffer] = MediaSource.last.buffers;
  assert.equal(buffer.type, 'video/mp4; codecs="avc1.42c00c"');
  assert.equal(engine.state, 'connecting'); // not an error
  engine.disconnect();
});

test('without audio: true the fallback asks for video only', async () => {
  const video = fakeVideo();
  const MediaSource = choosyMediaSource(video, () => true);
  const { engine, socket } = await fallbackSetup({ fallback: 'always', MediaSource, videoElement: video });
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { quality: 'auto' } });
  engine.disconnect();
});

// --- going back to WebRTC while the fallback plays --------------------------------------------

/** Play the fallback's first fragment, so the engine is live (fallback). */
function playFallback(MediaSource, socket) {
  MediaSource.last.open();
  socket.onmessage({ data: framed(1, 'cam', fixture('fallback-init.mp4')) });
  const buffer = MediaSource.last.buffers.at(-1);
  buffer.finish();
  socket.onmessage({ data: framed(2, 'cam', fixture('fallback-keyframe.m4s')) });
  buffer.finish(1000.04);
}

/** Answer the newest offer, as the server would. */
async function answerLatestOffer(socket) {
  await flush();
  await flush();
  const offer = socket.sent.filter((m) => m.type === 'offer').at(-1);
  socket.serverSends({ type: 'answer', streamId: 'cam', payload: 'v=0 answer', sessionId: offer.payload.sessionId });
  await flush();
  await flush();
  return offer;
}

class FakeMediaStream {
  constructor() { this.tracks = []; }
  getTracks() { return this.tracks; }
  addTrack(track) { this.tracks.push(track); }
  removeTrack(track) { this.tracks = this.tracks.filter((t) => t !== track); }
}

test('while the fallback plays, WebRTC is retried with backoff and takes over at its first decoded frame', async () => {
  globalThis.MediaStream = FakeMediaStream;
  const { clock, video, MediaSource, engine, socket } = await fallbackSetup({
    fallbackAfterMs: 3000, webrtcRetryMs: 5000, webrtcRetryMaxMs: 12000,
  });
  FakePeerConnection.last().becomes('failed'); // the first peer connection: fall back
  playFallback(MediaSource, socket);
  assert.equal(engine.state, 'live');
  const offers = () => socket.sent.filter((m) => m.type === 'offer');
  const before = offers().length;

  // Attempt 1 after 5 s: its peer connection fails; the fallback plays on.
  clock.advance(5000);
  await answerLatestOffer(socket);
  assert.equal(offers().length, before + 1);
  const first = FakePeerConnection.last();
  first.becomes('failed');
  assert.ok(first.closed);
  assert.equal(engine.transport, 'fallback');
  assert.equal(video.src, 'blob:fake-media-source');
  assert.equal(engine.getFallbackStats()?.webrtcAttempts, 1);

  // Attempt 2 after 10 s: connects, but no picture within fallbackAfterMs: abandoned.
  clock.advance(9999);
  await flush();
  assert.equal(offers().length, before + 1);
  clock.advance(1);
  await answerLatestOffer(socket);
  assert.equal(offers().length, before + 2);
  const second = FakePeerConnection.last();
  second.becomes('connected');
  assert.equal(engine.state, 'live');
  assert.equal(engine.transport, 'fallback');
  clock.advance(3000);
  assert.ok(second.closed);

  // Attempt 3 after 12 s (the cap, not 20): it decodes a frame and takes over.
  clock.advance(11999);
  await flush();
  assert.equal(offers().length, before + 2);
  clock.advance(1);
  const third = await answerLatestOffer(socket);
  assert.equal(offers().length, before + 3);
  const pc = FakePeerConnection.last();
  const track = { kind: 'video' };
  pc.ontrack({ track });
  pc.becomes('connected');
  const states = [];
  engine.on('state', (s) => states.push([s.state, s.detail]));
  clock.advance(250); // polled: no frame decoded yet
  await flush();
  assert.equal(engine.transport, 'fallback');
  assert.equal(video.srcObject, null); // the fallback's picture stays meanwhile
  pc.getStats = async () => new Map([['in', { type: 'inbound-rtp', kind: 'video', framesDecoded: 1 }]]);
  clock.advance(250);
  await flush();
  assert.equal(engine.transport, 'webrtc');
  assert.deepEqual(video.srcObject.getTracks(), [track]);
  assert.equal(video.src, '');
  assert.deepEqual(socket.sent.at(-1), { type: 'close', streamId: 'cam', payload: { fallback: true } });
  assert.deepEqual(states, [['live', null]]);
  assert.equal(engine.sessionId, third.payload.sessionId);
  assert.equal(engine.pc, pc);
  clock.advance(120000); // no more attempts
  await flush();
  assert.equal(offers().length, before + 3);
  engine.disconnect();
  delete globalThis.MediaStream;
});

test('a background attempt the server refuses leaves the fallback playing and is retried', async () => {
  const { clock, MediaSource, engine, socket } = await fallbackSetup({ fallback: 'always', webrtcRetryMs: 1000 });
  playFallback(MediaSource, socket);
  clock.advance(60000);
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 0); // 'always': never retried
  engine.setFallback('auto'); // playing: WebRTC is tried in the background at once
  await flush();
  await flush();
  const offer = socket.sent.filter((m) => m.type === 'offer').at(-1);
  socket.serverSends({
    type: 'error', streamId: 'cam', payload: 'ICE failed', code: 'peer_failed', sessionId: offer.payload.sessionId,
  });
  await flush();
  assert.equal(engine.transport, 'fallback');
  assert.equal(engine.state, 'live');
  assert.equal(engine.pc, null);
  clock.advance(2000); // the second attempt: after 2 s
  await flush();
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 2);
  engine.disconnect();
  assert.deepEqual(clock.pending(), []);
});

test('a background attempt offers the page\'s quality; its quality event waits until it takes over', async () => {
  globalThis.MediaStream = FakeMediaStream;
  const { clock, MediaSource, engine, socket } = await fallbackSetup({
    fallbackAfterMs: 3000, webrtcRetryMs: 1000, quality: 'sub',
  });
  FakePeerConnection.last().becomes('failed'); // the first peer connection: fall back
  playFallback(MediaSource, socket);
  const told = [];
  engine.on('quality', (q) => told.push(q.quality));

  clock.advance(1000); // the background attempt
  const offer = await answerLatestOffer(socket);
  assert.equal(offer.payload.quality, 'sub');
  const sessionId = offer.payload.sessionId;
  engine.setQuality('main'); // one message: the server gives it to the attempt's session and the fallback
  assert.deepEqual(socket.sent.at(-1), { type: 'quality', streamId: 'cam', payload: { quality: 'main', sessionId } });
  socket.serverSends({
    type: 'quality', streamId: 'cam', sessionId,
    payload: { quality: 'main', requested: 'main', reason: 'pinned', qualities: [{ name: 'main', width: 1280, height: 720 }, { name: 'sub', width: 320, height: 180 }] },
  });
  await flush();
  assert.deepEqual(told, []); // the fallback's picture is what shows meanwhile
  assert.equal(engine.quality, null);

  const pc = FakePeerConnection.last();
  pc.ontrack({ track: { kind: 'video' } });
  pc.becomes('connected');
  pc.getStats = async () => new Map([['in', { type: 'inbound-rtp', kind: 'video', framesDecoded: 1 }]]);
  clock.advance(250);
  await flush();
  assert.equal(engine.transport, 'webrtc');
  assert.deepEqual(told, ['main']);
  assert.equal(engine.quality, 'main');
  engine.disconnect();
  delete globalThis.MediaStream;
});

// --- the fallback's quality ------------------------------------------------------------------

/** A ResizeObserver the test fires, as the browser would when the element's size changes. */
class FakeResizeObserver {
  static last = null;
  constructor(callback) { this.callback = callback; FakeResizeObserver.last = this; }
  observe() {}
  disconnect() {}
  fire() { this.callback([], this); }
}

test('the fallback asks for the page\'s quality and tile, and follows setQuality and resizes', async () => {
  globalThis.devicePixelRatio = 2;
  const video = fakeVideo();
  const rect = { width: 240, height: 135 };
  video.getBoundingClientRect = () => ({ ...rect });
  const MediaSource = fakeMediaSource(video);
  const { clock, engine, socket } = await fallbackSetup({
    fallback: 'always', videoElement: video, MediaSource, quality: 'sub',
    ResizeObserver: FakeResizeObserver, webrtcRetryMs: 0,
  });
  assert.deepEqual(socket.sent.at(-1), {
    type: 'fallback', streamId: 'cam', payload: { quality: 'sub', tile: { width: 480, height: 270, visible: true } },
  });
  playFallback(MediaSource, socket);
  const told = [];
  engine.on('quality', (q) => told.push([q.quality, q.reason]));
  socket.serverSends({ type: 'quality', streamId: 'cam', payload: { quality: 'sub', requested: 'sub', reason: 'pinned', qualities: [] } });
  assert.deepEqual(told, [['sub', 'pinned']]); // the fallback's own word (no sessionId): told at once

  engine.setQuality('main'); // no peer connection: the fallback takes it, with no sessionId
  assert.deepEqual(socket.sent.at(-1), {
    type: 'quality', streamId: 'cam', payload: { quality: 'main', tile: { width: 480, height: 270, visible: true } },
  });
  socket.serverSends({ type: 'quality', streamId: 'cam', payload: { quality: 'main', requested: 'main', reason: 'pinned', qualities: [] } });
  assert.equal(engine.quality, 'main');

  engine.setQuality('auto');
  rect.width = 960; rect.height = 540; // made full screen: the tile is told to the fallback
  FakeResizeObserver.last.fire();
  assert.deepEqual(socket.sent.at(-1), {
    type: 'quality', streamId: 'cam', payload: { tile: { width: 1920, height: 1080, visible: true } },
  });
  assert.equal(socket.sent.filter((m) => m.type === 'offer').length, 0); // never a new offer
  assert.equal(engine.transport, 'fallback');
  engine.disconnect();
  clock.advance(1000);
  delete globalThis.devicePixelRatio;
});

test('a fallback refused for a quality the stream does not have ends in error, with no retry', async () => {
  const { clock, engine, socket } = await fallbackSetup({ fallback: 'always', quality: 'ultra' });
  assert.deepEqual(socket.sent.at(-1), { type: 'fallback', streamId: 'cam', payload: { quality: 'ultra' } });
  const errors = [];
  engine.on('error', (e) => errors.push([e.code, e.recoverable]));
  socket.serverSends({ type: 'error', streamId: 'cam', payload: 'Stream "cam" has no quality "ultra"; it has main (or "auto")', code: 'unknown_quality' });
  assert.deepEqual(errors, [['unknown_quality', false]]);
  assert.equal(engine.state, 'error');
  assert.equal(engine.transport, 'webrtc'); // the fallback's player is gone
  clock.advance(120000);
  await flush();
  assert.equal(socket.sent.filter((m) => m.type === 'fallback' || m.type === 'offer').length, 1);
  engine.disconnect();
});
