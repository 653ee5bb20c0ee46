//! Where does an endpoint id go? The router answers that and nothing else: it owns the
//! [`EndpointId`] newtype, the [`Route`] each id maps to, and the [`RoutingTable`] the proxy reads
//! on every connection. Lookups never do I/O; sources (the config file, the `PgwakeEndpoint`
//! resources of [`crd`]) replace the table's contents while readers keep going.

pub mod crd;
mod id;
pub mod settings;
mod table;

pub use crd::{run_crd_source, PgwakeEndpoint};
pub use id::{EndpointId, InvalidEndpointId};
pub use table::{
    AuthMode, BackendSpec, EndpointConfig, PodOverrides, Route, RouteError, RoutingTable, TableDiff,
};
