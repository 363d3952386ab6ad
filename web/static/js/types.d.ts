// The globals the browser scripts share, declared for the type checker only (`tsc --noEmit`,
// see tsconfig.json); no page loads this file and nothing is built.
//
// The scripts are classic <script>s loaded in order: websocket-manager.js, webrtc-engine.js, then
// pages/common.js and a page's own script. The first two put their classes on `window` and also
// export them for Node (the unit tests), which is how TypeScript reads their types: each name
// below is both the global class and the type of its instances (spelled `InstanceType<…>`, which
// TypeScript 6 and 7 both read from a CommonJS export); so does pages/wall.js, the camera wall's
// layout (`MediaStreamWall`). pages/common.js declares
// `MediaStreamPages` as a global `var`, which TypeScript sees by itself.

declare var WebSocketManager: typeof import('./websocket-manager.js').WebSocketManager;
type WebSocketManager = InstanceType<typeof WebSocketManager>;

declare var MediaStreamEmitter: typeof import('./websocket-manager.js').MediaStreamEmitter;
type MediaStreamEmitter<Events extends object> = InstanceType<typeof MediaStreamEmitter<Events>>;

declare var WebRTCEngine: typeof import('./webrtc-engine.js').WebRTCEngine;
type WebRTCEngine = InstanceType<typeof WebRTCEngine>;

declare var MediaStreamWall: typeof import('./pages/wall.js');

interface Window {
  // What the pages expose for the end-to-end tests and the benchmarks (tests/e2e, benchmarks/).
  /** test-multi-stream.html */
  msTestPage?: { manager: WebSocketManager; engines: Map<string, WebRTCEngine> };
  /** dashboard.html */
  msDashboard?: {
    manager: WebSocketManager;
    tiles: Map<string, { engine: WebRTCEngine }>;
    layout: InstanceType<typeof MediaStreamWall.Wall>;
  };
  /** viewer.html */
  msViewer?: { readonly engine: WebRTCEngine | null };
}
