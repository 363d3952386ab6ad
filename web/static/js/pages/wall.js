// @ts-check
/**
 * The camera wall's layout (dashboard.html): tiles in a grid that fills the viewport — one
 * tile, 2×2, 3×3, 4×4 (paged when there are more cameras than cells) or "fit all" — or the
 * older free grid that scrolls ("by size"). A tile opens full screen on double-click and comes
 * back on Escape; tiles move by drag and drop or with their ◀ ▶ buttons. The layout, the page
 * and the tile order survive a reload (localStorage), and `?layout=` in the address chooses a
 * layout for one screen (a kiosk per monitor).
 *
 * The page's tiles stay dashboard.js's: this only places them. Tiles on another page are
 * `hidden`, so the dashboard's IntersectionObserver stops their streams as for a tile scrolled
 * out of view.
 */

/** @typedef {'1'|'2'|'3'|'4'|'fit'|'scroll'} WallLayout */
/** @typedef {{layout: WallLayout, page: number, order: string[]}} WallState */

(function (root) {
  'use strict';

  /** @type {WallLayout[]} */
  const LAYOUTS = ['1', '2', '3', '4', 'fit', 'scroll'];
  const STORAGE_KEY = 'mediastream.wall';
  const VIDEO_ASPECT = 16 / 9;

  /**
   * The grid that shows `count` tiles of `aspect` (width / height) largest in a `width` ×
   * `height` area: the number of columns and rows whose cells hold the biggest picture.
   * @param {number} count
   * @param {number} width
   * @param {number} height
   * @param {number} [aspect]
   * @returns {{cols: number, rows: number}}
   */
  function fitGrid(count, width, height, aspect = VIDEO_ASPECT) {
    if (count <= 1 || width <= 0 || height <= 0) return { cols: 1, rows: 1 };
    let best = { cols: 1, rows: count, area: -1 };
    // Widest first: of two grids with pictures as big, the one with more columns (screens are wide).
    for (let cols = count; cols >= 1; cols--) {
      const rows = Math.ceil(count / cols);
      const cellWidth = width / cols;
      const cellHeight = height / rows;
      const pictureWidth = Math.min(cellWidth, cellHeight * aspect);
      const area = pictureWidth * (pictureWidth / aspect);
      if (area > best.area + 1e-9) best = { cols, rows, area };
    }
    return { cols: best.cols, rows: best.rows };
  }

  /**
   * The tiles in the order to show: those of `saved` first, in its order, then the others in
   * the order they came.
   * @param {string[]} ids
   * @param {string[]} saved
   * @returns {string[]}
   */
  function ordered(ids, saved) {
    const position = new Map(saved.map((id, index) => [id, index]));
    const known = ids.filter((id) => position.has(id)).sort((a, b) => (position.get(a) ?? 0) - (position.get(b) ?? 0));
    return [...known, ...ids.filter((id) => !position.has(id))];
  }

  /**
   * `id` moved by `offset` places (−1 earlier, +1 later), clamped to the ends.
   * @param {string[]} order @param {string} id @param {number} offset
   * @returns {string[]}
   */
  function moved(order, id, offset) {
    const from = order.indexOf(id);
    if (from < 0) return order;
    const to = Math.max(0, Math.min(order.length - 1, from + offset));
    const result = order.filter((other) => other !== id);
    result.splice(to, 0, id);
    return result;
  }

  /**
   * A saved state, or the defaults for what is missing or unreadable.
   * @param {unknown} value what localStorage held (parsed)
   * @returns {WallState}
   */
  function readState(value) {
    /** @type {WallState} */
    const state = { layout: 'fit', page: 0, order: [] };
    if (typeof value !== 'object' || value === null) return state;
    const fields = /** @type {{[key: string]: unknown}} */ (value);
    if (typeof fields.layout === 'string' && LAYOUTS.includes(/** @type {WallLayout} */ (fields.layout))) {
      state.layout = /** @type {WallLayout} */ (fields.layout);
    }
    if (typeof fields.page === 'number' && Number.isInteger(fields.page) && fields.page >= 0) state.page = fields.page;
    if (Array.isArray(fields.order)) state.order = fields.order.filter((id) => typeof id === 'string');
    return state;
  }

  /**
   * Lays the dashboard's tiles out in `wall`.
   */
  class Wall {
    /** @type {HTMLElement} */ #wall;
    /** @type {Map<string, HTMLElement>} */ #tiles = new Map();
    /** @type {WallState} */ #state;
    /** @type {{layout: HTMLSelectElement|null, previous: HTMLButtonElement|null, next: HTMLButtonElement|null, page: HTMLElement|null}} */
    #controls;
    /** @type {string|null} the tile being dragged */ #dragged = null;

    /**
     * @param {HTMLElement} wall the grid's element
     * @param {{layout?: HTMLSelectElement|null, previous?: HTMLButtonElement|null, next?: HTMLButtonElement|null, page?: HTMLElement|null}} controls
     */
    constructor(wall, controls) {
      this.#wall = wall;
      this.#controls = { layout: null, previous: null, next: null, page: null, ...controls };
      this.#state = readState(load());
      const asked = new URLSearchParams(root.location.search).get('layout');
      if (asked && LAYOUTS.includes(/** @type {WallLayout} */ (asked))) this.#state.layout = /** @type {WallLayout} */ (asked);
      const { layout, previous, next } = this.#controls;
      if (layout) {
        layout.value = this.#state.layout;
        layout.addEventListener('change', () => this.setLayout(/** @type {WallLayout} */ (layout.value)));
      }
      previous?.addEventListener('click', () => this.showPage(this.#state.page - 1));
      next?.addEventListener('click', () => this.showPage(this.#state.page + 1));
      new ResizeObserver(() => this.#place()).observe(wall);
      wall.addEventListener('dragover', (event) => {
        if (this.#dragged) event.preventDefault(); // a tile may be dropped here
      });
      wall.addEventListener('drop', (event) => this.#drop(event));
      root.document.addEventListener('keydown', (event) => {
        if (event.key === 'Escape' && root.document.fullscreenElement) root.document.exitFullscreen().catch(() => {});
        if (event.key === 'Escape') for (const tile of this.#tiles.values()) tile.classList.remove('enlarged');
      });
      this.#place();
    }

    /** @returns {WallState} the layout, the page shown and the tile order */
    get state() {
      return { ...this.#state, order: this.#order() };
    }

    /**
     * Place a new tile (in its saved position, if it has one).
     * @param {string} id @param {HTMLElement} tile
     */
    add(id, tile) {
      this.#tiles.set(id, tile);
      tile.draggable = true;
      tile.addEventListener('dblclick', () => this.toggleFullscreen(id));
      tile.addEventListener('dragstart', (event) => {
        this.#dragged = id;
        event.dataTransfer?.setData('text/plain', id);
        tile.classList.add('dragging');
      });
      tile.addEventListener('dragend', () => {
        this.#dragged = null;
        tile.classList.remove('dragging');
      });
      const button = (/** @type {string} */ label, /** @type {string} */ title, /** @type {() => void} */ action) => {
        const element = root.document.createElement('button');
        element.type = 'button';
        element.textContent = label;
        element.title = title;
        element.setAttribute('aria-label', title);
        element.addEventListener('click', (event) => {
          event.stopPropagation();
          action();
        });
        element.addEventListener('dblclick', (event) => event.stopPropagation());
        return element;
      };
      const actions = root.document.createElement('div');
      actions.className = 'tile-actions';
      actions.append(
        button('◀', 'Move earlier', () => this.move(id, -1)),
        button('▶', 'Move later', () => this.move(id, 1)),
        button('⛶', 'Full screen', () => this.toggleFullscreen(id)),
      );
      tile.append(actions);
      this.#wall.append(tile);
      this.#place();
    }

    /** @param {string} id */
    remove(id) {
      const tile = this.#tiles.get(id);
      if (!tile) return;
      this.#tiles.delete(id);
      tile.remove();
      this.#place();
    }

    /** @param {WallLayout} layout */
    setLayout(layout) {
      if (!LAYOUTS.includes(layout)) throw new Error(`Unknown wall layout "${layout}"; one of ${LAYOUTS.join(', ')}`);
      this.#state.layout = layout;
      this.#state.page = 0;
      if (this.#controls.layout) this.#controls.layout.value = layout;
      this.#save();
      this.#place();
    }

    /** @param {number} page 0-based; clamped to the pages there are */
    showPage(page) {
      this.#state.page = Math.max(0, Math.min(this.#pageCount() - 1, Math.min(page, this.#pageCount() - 1)));
      this.#save();
      this.#place();
    }

    /**
     * Move a tile `offset` places (−1 earlier, +1 later).
     * @param {string} id @param {number} offset
     */
    move(id, offset) {
      this.#reorder(moved(this.#order(), id, offset));
    }

    /**
     * Full screen for one tile, or back to the wall if it already is (Escape does that too).
     * Browsers without the Fullscreen API for elements get the tile enlarged over the wall.
     * @param {string} id
     */
    toggleFullscreen(id) {
      const tile = this.#tiles.get(id);
      if (!tile) return;
      const document = root.document;
      if (document.fullscreenElement) {
        document.exitFullscreen().catch(() => {});
        return;
      }
      if (typeof tile.requestFullscreen === 'function' && document.fullscreenEnabled) {
        tile.requestFullscreen().catch(() => tile.classList.toggle('enlarged'));
      } else {
        tile.classList.toggle('enlarged');
      }
    }

    // --- internals -------------------------------------------------------------------------

    /** The tile ids in the order shown: the saved order, then new ones as they came. */
    #order() {
      return ordered([...this.#tiles.keys()], this.#state.order);
    }

    /** @param {string[]} order */
    #reorder(order) {
      // Ids of tiles not on this page now (a camera removed meanwhile) keep their place for later.
      const shown = new Set(order);
      this.#state.order = [...order, ...this.#state.order.filter((id) => !shown.has(id))];
      this.#save();
      this.#place();
    }

    /** @param {DragEvent} event */
    #drop(event) {
      const dragged = this.#dragged;
      this.#dragged = null;
      if (!dragged) return;
      event.preventDefault();
      const target = /** @type {HTMLElement|null} */ (event.target instanceof Element ? event.target.closest('.tile') : null);
      const targetId = target ? target.dataset.streamId : undefined;
      if (!targetId || targetId === dragged) return;
      const order = this.#order();
      this.#reorder(moved(order, dragged, order.indexOf(targetId) - order.indexOf(dragged)));
    }

    #cellsPerPage() {
      const layout = this.#state.layout;
      if (layout === 'fit' || layout === 'scroll') return Math.max(1, this.#tiles.size);
      return Number(layout) ** 2;
    }

    #pageCount() {
      return Math.max(1, Math.ceil(this.#tiles.size / this.#cellsPerPage()));
    }

    /** Order the tiles, show the current page's, and size the grid. */
    #place() {
      const { layout } = this.#state;
      const order = this.#order();
      const perPage = this.#cellsPerPage();
      const pages = this.#pageCount();
      // The saved page stays as it is while tiles are still arriving; the one shown is clamped.
      const current = Math.min(this.#state.page, pages - 1);
      const first = current * perPage;
      order.forEach((id, index) => {
        const tile = /** @type {HTMLElement} */ (this.#tiles.get(id));
        tile.style.order = String(index);
        tile.hidden = layout !== 'scroll' && (index < first || index >= first + perPage);
      });
      const wall = this.#wall;
      wall.dataset.layout = layout;
      root.document.body.classList.toggle('wall-fills-viewport', layout !== 'scroll');
      let grid = { cols: 1, rows: 1 };
      if (layout === 'fit') {
        grid = fitGrid(this.#tiles.size, wall.clientWidth, wall.clientHeight);
      } else if (layout !== 'scroll') {
        const side = Number(layout);
        grid = { cols: side, rows: side };
      }
      wall.style.setProperty('--cols', String(grid.cols));
      wall.style.setProperty('--rows', String(grid.rows));
      const { previous, next, page } = this.#controls;
      if (page) {
        page.hidden = pages < 2;
        page.textContent = `${current + 1} / ${pages}`;
      }
      if (previous) {
        previous.hidden = pages < 2;
        previous.disabled = current === 0;
      }
      if (next) {
        next.hidden = pages < 2;
        next.disabled = current >= pages - 1;
      }
    }

    #save() {
      try {
        root.localStorage.setItem(STORAGE_KEY, JSON.stringify(this.state));
      } catch (_) {
        /* storage full or refused (private mode): the wall works, it just won't remember */
      }
    }
  }

  /** @returns {unknown} the saved state, parsed, or null */
  function load() {
    try {
      return JSON.parse(root.localStorage.getItem(STORAGE_KEY) || 'null');
    } catch (_) {
      return null;
    }
  }

  const exported = { Wall, fitGrid, ordered, moved, readState, LAYOUTS };
  root.MediaStreamWall = exported;
  if (typeof module === 'object' && module.exports) module.exports = exported;
})(globalThis);
