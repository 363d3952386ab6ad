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
