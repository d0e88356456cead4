"""The Flower apps: ``fedlora.app.server`` (the ServerApp and its strategies) and
``fedlora.app.client`` (the ClientApp). Thin glue over the library; the library never
imports them and neither imports the other."""
