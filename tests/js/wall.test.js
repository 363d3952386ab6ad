// Unit tests of the camera wall's pure layout logic (web/static/js/pages/wall.js); the layouts
// themselves are tested in Chromium (tests/e2e/test_wall.py).
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { fitGrid, ordered, moved, readState } = require('../../web/static/js/pages/wall.js');

test('fit all picks the grid with the biggest 16:9 pictures', () => {
  assert.deepEqual(fitGrid(1, 1600, 900), { cols: 1, rows: 1 });
  assert.deepEqual(fitGrid(4, 1600, 900), { cols: 2, rows: 2 });
  assert.deepEqual(fitGrid(6, 1600, 900), { cols: 3, rows: 2 });
  assert.deepEqual(fitGrid(16, 1600, 900), { cols: 4, rows: 4 });
  assert.deepEqual(fitGrid(3, 1600, 900), { cols: 2, rows: 2 });
  // A tall, narrow screen stacks them.
  assert.deepEqual(fitGrid(3, 400, 1200), { cols: 1, rows: 3 });
  // A very wide one lines them up.
  assert.deepEqual(fitGrid(4, 3840, 540), { cols: 4, rows: 1 });
});

test('fit all never gives fewer cells than tiles, nor an empty row', () => {
  for (let count = 1; count <= 40; count++) {
    for (const [width, height] of [[1920, 1080], [1280, 1000], [800, 1200], [3000, 600]]) {
      const { cols, rows } = fitGrid(count, width, height);
      assert.ok(cols * rows >= count, `${count} tiles in ${cols}x${rows}`);
      assert.ok(cols * (rows - 1) < count, `${count} tiles leave a row of ${cols}x${rows} empty`);
    }
  }
});

test('fit all of nothing, or in no room, is one cell', () => {
  assert.deepEqual(fitGrid(0, 1600, 900), { cols: 1, rows: 1 });
  assert.deepEqual(fitGrid(5, 0, 0), { cols: 1, rows: 1 });
});

test('the saved order comes first, new tiles after in the order they came', () => {
  assert.deepEqual(ordered(['a', 'b', 'c', 'd'], ['c', 'gone', 'a']), ['c', 'a', 'b', 'd']);
  assert.deepEqual(ordered(['a', 'b'], []), ['a', 'b']);
});

test('a tile moves one place either way, and stops at the ends', () => {
  assert.deepEqual(moved(['a', 'b', 'c'], 'b', -1), ['b', 'a', 'c']);
  assert.deepEqual(moved(['a', 'b', 'c'], 'b', 1), ['a', 'c', 'b']);
  assert.deepEqual(moved(['a', 'b', 'c'], 'a', -1), ['a', 'b', 'c']);
  assert.deepEqual(moved(['a', 'b', 'c'], 'a', 5), ['b', 'c', 'a']);
  assert.deepEqual(moved(['a', 'b', 'c'], 'x', 1), ['a', 'b', 'c']);
});

test('a saved state is read field by field; what is wrong falls back to the defaults', () => {
  assert.deepEqual(readState({ layout: '3', page: 2, order: ['a', 7, 'b'] }), { layout: '3', page: 2, order: ['a', 'b'] });
  assert.deepEqual(readState({ layout: '5x5', page: -1, order: 'a' }), { layout: 'fit', page: 0, order: [] });
  assert.deepEqual(readState(null), { layout: 'fit', page: 0, order: [] });
});
