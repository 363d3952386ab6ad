"""Media: sources, frames and fan-out. No WebRTC and no asyncio here."""
