"""Cedar policies and schema shipped with scopegraph.

``baseline.cedar`` is the default policy set; ``schema.cedarschema`` declares the
entities, the ``call`` action and its request context. The orchestrator loads these
files; this package holds no code.
"""
