"""Names shared by the ext_proc and the Envoy configuration generated for it (no heavy imports here)."""

# Endpoint Picker Protocol (Gateway API Inference Extension).
LB_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"

# This project's routing contract between the ext_proc and Envoy's routes.
POOL_HEADER = "x-extproc-pool"  # set for model-based routing; header routes match on it
POOL_METADATA = "x-pool"  # gRPC initial metadata a path route or weighted cluster sets: the pool Envoy chose
CLUSTER_PREFIX = "pool-"  # Envoy cluster of pool NAME is pool-NAME
DEFAULT_ROUTE = "default"  # the route taken before the ext_proc has decided; its cluster means nothing
CLUSTER_ATTRIBUTE = "xds.cluster_name"
ROUTE_ATTRIBUTE = "xds.route_name"

# Response headers Envoy adds, so clients and tests can see where a request went.
UPSTREAM_HOST_HEADER = "x-gateway-upstream-host"
PICKED_HEADER = "x-gateway-picked-endpoint"
POOL_RESPONSE_HEADER = "x-gateway-pool"  # the pool whose cluster served the request, e.g. "1b"
ROUTING_US_HEADER = "x-gateway-routing-us"  # microseconds from the request's last byte to the upstream send

# Envoy's response-code details of the picker's own replies (extproc_<status>, extproc_models). They are already
# OpenAI JSON; the generated local_reply_config recognises them by this prefix and passes them unchanged.
REPLY_DETAILS_PREFIX = "extproc_"


def split_route_name(split: str) -> str:
    """The Envoy route (and its stat prefix, and the picker's ``route`` label) of the split named ``split``."""
    return f"{split}-split"
