// Video over the socket (fallback): the binary framing, its routing to the stream, and what the
// engine reads of the server's fMP4 (node --test). The fMP4 fixtures were written by the
// server's own remuxer (src/mediastream/media/fmp4.py) from libx264 frames.
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
