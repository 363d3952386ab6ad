"""WebRTC, through aiortc. The only package that touches asyncio."""
