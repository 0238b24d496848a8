//! Direct calls by name: `register`, `call` (ringing, with a timeout), `accept`,
//! `reject`, and how a ringing call ends.

use super::*;

#[derive(Debug)]
pub(super) struct PendingCall {
    pub(super) caller: ConnId,
    pub(super) callee: ConnId,
    pub(super) deadline: Instant,
}

impl Rooms {
    pub(super) fn register(
        &mut self,
        conn: ConnId,
        name: &str,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        let name = validate_name("name", name).map_err(|e| Refusal(e.code, e.message))?;
        match self.names.get(name) {
            Some(&holder) if holder != conn => {
                return refuse(ErrorCode::NameTaken, format!("the name `{name}` is taken"));
            }
            Some(_) => {}
            None => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return refuse(ErrorCode::Internal, "unknown connection");
                };
                if let Some(old) = c.registered.replace(name.to_owned()) {
                    self.names.remove(&old);
                }
                self.names.insert(name.to_owned(), conn);
                info!(peer = %self.peer_id(conn), name, "registered");
            }
        }
        out.push((
            conn,
            ServerMessage::Registered {
                name: name.to_owned(),
            },
        ));
        Ok(())
    }

    pub(super) fn call(
        &mut self,
        conn: ConnId,
        to: &str,
        now: Now,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        let Some(from) = self.conns.get(&conn).and_then(|c| c.registered.clone()) else {
            return refuse(
                ErrorCode::BadField,
                "register a name before calling (`register` first)",
            );
        };
        let to = validate_name("to", to).map_err(|e| Refusal(e.code, e.message))?;
        let callee = match self.names.get(to) {
            None => {
                let call_id = ids::call_id();
                info!(call = %call_id, from, to, "call to offline name");
                out.push((
                    conn,
                    ServerMessage::CallRejected {
                        call_id,
                        reason: CallRejectReason::Offline,
                    },
                ));
                return Ok(());
            }
            Some(&callee) if callee == conn => {
                return refuse(ErrorCode::BadField, "`to` is your own name");
            }
            Some(&callee) => callee,
        };
        let busy = self
            .conns
            .get(&callee)
            .is_none_or(|c| c.room.is_some() || c.rung_by.is_some());
        if busy {
            let call_id = ids::call_id();
            info!(call = %call_id, from, to, "callee busy");
            out.push((
                conn,
                ServerMessage::CallRejected {
                    call_id,
                    reason: CallRejectReason::Busy,
                },
            ));
            return Ok(());
        }
        self.leave_room(conn, LeaveReason::Left, now, out);
        let call_id = ids::call_id();
        info!(call = %call_id, from, to, "ringing");
        out.push((
            conn,
            ServerMessage::Ringing {
                call_id: call_id.clone(),
                to: to.to_owned(),
            },
        ));
        self.enter_room(conn, &call_id, Some(from.clone()), false, out);
        self.calls.insert(
            call_id.clone(),
            PendingCall {
                caller: conn,
                callee,
                deadline: now.mono + self.config.ring_timeout,
            },
        );
        if let Some(c) = self.conns.get_mut(&callee) {
            c.rung_by = Some(call_id.clone());
        }
        out.push((callee, ServerMessage::IncomingCall { call_id, from }));
        Ok(())
    }

    /// The pending call `call_id` where `conn` is the callee.
    pub(super) fn incoming_call(&self, conn: ConnId, call_id: &str) -> Result<(), Refusal> {
        match self.calls.get(call_id) {
            Some(call) if call.callee == conn => Ok(()),
            _ => refuse(
                ErrorCode::UnknownCall,
                "no call with that `call_id` is ringing you",
            ),
        }
    }

    pub(super) fn accept(
        &mut self,
        conn: ConnId,
        call_id: &str,
        now: Now,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        self.incoming_call(conn, call_id)?;
        self.calls.remove(call_id);
        let name = self.conns.get_mut(&conn).and_then(|c| {
            c.rung_by = None;
            c.registered.clone()
        });
        info!(call = %call_id, peer = %self.peer_id(conn), "call accepted");
        self.leave_room(conn, LeaveReason::Left, now, out);
        self.enter_room(conn, call_id, name, false, out);
        Ok(())
    }

    pub(super) fn reject(
        &mut self,
        conn: ConnId,
        call_id: &str,
        out: &mut Outbox,
    ) -> Result<(), Refusal> {
        self.incoming_call(conn, call_id)?;
        info!(call = %call_id, peer = %self.peer_id(conn), "call rejected");
        self.end_pending_call(call_id, Some(CallRejectReason::Rejected), false, out);
        Ok(())
    }

    /// Ends a call that is still ringing: the room goes away with the caller in it.
    /// `caller_reason` is what the caller hears (none when the caller itself gave up);
    /// `cancel_callee` tells the callee that the ringing stopped.
    pub(super) fn end_pending_call(
        &mut self,
        call_id: &str,
        caller_reason: Option<CallRejectReason>,
        cancel_callee: bool,
        out: &mut Outbox,
    ) {
        let Some(call) = self.calls.remove(call_id) else {
            return;
        };
        self.rooms.remove(call_id);
        if let Some(caller) = self.conns.get_mut(&call.caller)
            && caller.room.as_deref() == Some(call_id)
        {
            caller.room = None;
        }
        if let Some(callee) = self.conns.get_mut(&call.callee) {
            callee.rung_by = None;
        }
        if let Some(reason) = caller_reason {
            out.push((
                call.caller,
                ServerMessage::CallRejected {
                    call_id: call_id.to_owned(),
                    reason,
                },
            ));
        }
        // The callee hears `call_cancelled` whenever it did not end the call itself.
        if cancel_callee || caller_reason.is_none() {
            out.push((
                call.callee,
                ServerMessage::CallCancelled {
                    call_id: call_id.to_owned(),
                },
            ));
        }
    }
}
