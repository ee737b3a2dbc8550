"""The Streamlit search UI (``cir ui``): a client of the CIR gRPC server.

``frontend.app`` is the Streamlit script, ``frontend.gateway`` its adapter over
``server.client.CIRClient``, ``frontend.state`` the plain parts (reference, history steps,
upload checks, filters), ``frontend.cli`` the ``cir ui`` command.
"""
