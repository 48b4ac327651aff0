//! The cluster store on Redis (being written).
