//! HTTP: the API handlers (rooms, ICE servers, OpenAPI) in `api`, and the browser
//! client in `web`.

pub(crate) mod api;
pub(crate) mod web;
