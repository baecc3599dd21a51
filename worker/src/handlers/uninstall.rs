//! `ONAPPUNINSTALL`: its auth has only `application_token` (verified against the stored
//! one before this runs). The portal is marked uninstalled and its tokens erased; with
//! `CLEAN=1` (the admin chose to delete the app's data) its stored entities go too. An
//! audit row remembers either.

use super::{Done, Failure};
use b24_shared::db::DbPool;
use b24_shared::event::MemberId;
use b24_shared::portals;

pub async fn run(pool: &DbPool, member_id: &MemberId, clean: bool) -> Result<Done, Failure> {
    let mut client = pool.get().await?;
    let erased = portals::uninstall(&mut client, member_id, clean).await?;
    tracing::info!(%member_id, clean, entities_deleted = erased, "portal uninstalled; tokens erased");
    Ok(Done::Stored)
}
