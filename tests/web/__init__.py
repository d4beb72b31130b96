"""Browser tests of web/withanyone.js against real ComfyUI frontends."""
