"""The teacher's side: its pass over dataset x views into a store (``build``), the device-side encoding and
the writer thread (``writer``), a build's size and time before it runs (``estimate``), and stored targets checked
against a fresh teacher pass (``verify``)."""
