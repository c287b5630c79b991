"""Voice: speech to text with faster-whisper (`asr`) and text to speech sentence by sentence with
piper (its own process) or espeak-ng (`tts`); the Whisper models come from PyPI packages
(`models`), so nothing is downloaded at run time."""
