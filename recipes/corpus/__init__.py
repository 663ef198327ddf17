"""A captioned music corpus built offline: procedural MIDI compositions rendered with fluidsynth.

``make_corpus.py`` is the command; the modules it uses, each with one job:

- :mod:`instruments`: the General MIDI programs the recipe plays, with caption names and families;
- :mod:`styles`: style presets (ballad, rock, waltz, electronic, jazz, ...): tempo ranges, meters,
  instruments and accompaniment patterns each style draws from;
- :mod:`compose`: a song's parameters (:class:`~compose.SongSpec`, drawn from the seed) and the
  MIDI file they become;
- :mod:`captions`: natural-language captions and audiocraft-style metadata from the parameters;
- :mod:`render`: fluidsynth and the soundfont (found, checked, licence recorded) and the wav
  post-processing.
"""
