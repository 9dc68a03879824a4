//! A store shared by a fork family: one [`Store`] (one store file), one handle per member.
//!
//! Owns: the family's lock around its [`Store`] and this member's index in it. Each
//! [`SharedStore`] acts for one member: what it inserts is that member's, what it removes loses
//! only that member's owner bit (see [`crate::protocol::store_layout`], "Fork families").
//! Must not touch: uffd, processes, page maps. Lock order: a client's state lock, then this
//! store's lock; nothing takes a client's lock while holding a store's.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};

use super::{Encoded, Handle, Store, StoreError, StoreStats};
use crate::PAGE_SIZE;

/// One family member's access to the family's store.
pub struct SharedStore {
    inner: Arc<Mutex<Store>>,
    member: u8,
}

impl SharedStore {
    /// The first member (index 0) of a new family owning `store`.
    pub fn new(store: Store) -> SharedStore {
        SharedStore {
            inner: Arc::new(Mutex::new(store)),
            member: 0,
        }
    }

    /// Member `member` of a family whose store was adopted (see [`Store::adopt`]); `None` if
    /// that member is attached already.
    pub fn adopted(inner: &Arc<Mutex<Store>>, member: u8) -> Option<SharedStore> {
        if !inner.lock().adopt_member(member) {
            return None;
        }
        Some(SharedStore {
            inner: inner.clone(),
            member,
        })
    }

    /// The family's store itself (to find it again for another member).
    pub fn family(&self) -> &Arc<Mutex<Store>> {
        &self.inner
    }

    /// A handle for a new member of the same family; `None` when the family is full
    /// ([`crate::protocol::store_layout::MAX_OWNERS`] live members).
    pub fn join(&self) -> Option<SharedStore> {
        let member = self.inner.lock().join_member()?;
        Some(SharedStore {
            inner: self.inner.clone(),
            member,
        })
    }

    /// This member's index (its owner bit in the records).
    pub fn member(&self) -> u8 {
        self.member
    }

    /// Members sharing the store (live handles).
    pub fn member_count(&self) -> u32 {
        self.inner.lock().member_count()
    }

    /// The family's store, locked (for batches of operations; mind the member index).
    pub fn lock(&self) -> MutexGuard<'_, Store> {
        self.inner.lock()
    }

    /// A duplicate of the store file's descriptor.
    pub fn file_clone(&self) -> std::io::Result<Option<std::fs::File>> {
        self.inner.lock().file().map(|f| f.try_clone()).transpose()
    }

    pub fn insert(
        &mut self,
        enc: Encoded<'_>,
        page: &[u8; PAGE_SIZE],
        addr: u64,
    ) -> Result<Handle, StoreError> {
        self.inner.lock().insert_as(self.member, enc, page, addr)
    }

    pub fn put(&mut self, page: &[u8; PAGE_SIZE], addr: u64) -> Result<Handle, StoreError> {
        self.inner.lock().put_as(self.member, page, addr)
    }

    pub fn get(&self, h: Handle, out: &mut [u8; PAGE_SIZE]) -> Result<(), StoreError> {
        self.inner.lock().get(h, out)
    }

    /// See [`Store::set_addr_as`]: returns the handle to keep (a copy when shared).
    pub fn set_addr(&mut self, h: Handle, addr: u64) -> Result<Handle, StoreError> {
        self.inner.lock().set_addr_as(self.member, h, addr)
    }

    pub fn try_remove(&mut self, h: Handle) -> Result<(), StoreError> {
        self.inner.lock().try_remove_as(self.member, h)
    }

    pub fn remove(&mut self, h: Handle) {
        self.inner.lock().remove_as(self.member, h)
    }

    /// Makes this member's page `h` a page of `other` too (see [`Store::share`]).
    pub fn share_with(&mut self, h: Handle, other: &SharedStore) -> Result<(), StoreError> {
        debug_assert!(Arc::ptr_eq(&self.inner, &other.inner));
        self.inner.lock().share(h, other.member)
    }

    /// The family store's disk epoch (see [`Store::disk_epoch`]).
    pub fn disk_epoch(&self) -> u64 {
        self.inner.lock().disk_epoch()
    }

    /// The family store's figures (shared by every member).
    pub fn stats(&self) -> StoreStats {
        self.inner.lock().stats()
    }

    /// Drops every page in `handles` (this member's last pages) and leaves the family.
    pub fn release_all(&mut self, handles: impl IntoIterator<Item = Handle>) {
        let mut st = self.inner.lock();
        for h in handles {
            st.remove_as(self.member, h);
        }
    }
}

impl Drop for SharedStore {
    fn drop(&mut self) {
        self.inner.lock().leave_member(self.member);
    }
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("member", &self.member)
            .finish_non_exhaustive()
    }
}
