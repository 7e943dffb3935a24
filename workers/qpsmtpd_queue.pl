#!/usr/bin/perl
# The helper of qrouter's queue/qpsmtpd transport (workers/qpsmtpd_queue.py): it runs qpsmtpd
# queue plugins with qpsmtpd's own classes, so a plugin behaves as it does in qpsmtpd.
#
# Each plugin line (`queue/smtp-forward 10.1.1.1 25`) is loaded once, by Qpsmtpd::_load_plugin as
# qpsmtpd loads config/plugins, and its queue hooks are kept. A message becomes a
# Qpsmtpd::Transaction as Qpsmtpd::SMTP::data_respond makes one from DATA, and the hooks run as
# qpsmtpd runs them: the first answer other than DECLINED wins.
#
# One request at a time on stdin, one answer on stdout; a frame is a 4-byte big-endian length and
# that many bytes:
#   request: JSON {id, dir, line, sender, recipients}, then the message as queued
#   answer:  JSON {rc, message, error, server}
# rc names the hook's return code (OK, DENY, DENYSOFT, DENY_DISCONNECT, DENYSOFT_DISCONNECT,
# DECLINED, DONE, or the number a plugin made up), message is its text on one line, error the
# text of a die while loading or running the plugin, and server the last reply a server gave the
# plugin through Net::Cmd (Net::SMTP), {command, reply}, or null. End of input: it exits.
#
# Arguments: the host name for config('me'), and a directory of its own for the message bodies
# (Qpsmtpd::Transaction spools them to disk; qpsmtpd's spool_dir belongs to the qpsmtpd user),
# which the transport made and removes after the helper, also after a killed one. Plugins log
# through qpsmtpd's log: warnings and worse go to stderr, prefixed with the queue id; the
# transport copies that to qrouter's log.
use strict;
use warnings;

use JSON::PP;
use Mail::Header;
use Net::Cmd;
use Qpsmtpd;
use Qpsmtpd::Address;
use Qpsmtpd::Connection;
use Qpsmtpd::Constants;
use Qpsmtpd::Plugin;
use Qpsmtpd::Transaction;

my ($me, $spool) = @ARGV;
die "usage: $0 HOSTNAME DIRECTORY\n" unless defined $spool;
$Qpsmtpd::Spool_dir = "$spool/";
END { rmdir $spool if defined $spool }    # empty by then; a worker that died cannot remove it
my $json = JSON::PP->new->utf8;
our $queue_id = '';    # of the request in progress, for the log

my %name_of = map { (return_code($_) => $_) }
  qw(OK DENY DENYSOFT DENY_DISCONNECT DENYSOFT_DISCONNECT DECLINED DONE YIELD);

# The protocol keeps stdin and stdout to itself: a plugin that reads stdin gets /dev/null, and
# what it prints goes to stderr (to the log), not into an answer.
open(my $requests, '<&', \*STDIN) or die "cannot duplicate stdin: $!\n";
open(my $answers, '>&', \*STDOUT) or die "cannot duplicate stdout: $!\n";
open(STDIN, '<', '/dev/null') or die "cannot open /dev/null: $!\n";
open(STDOUT, '>&', \*STDERR) or die "cannot send stdout to stderr: $!\n";
binmode $_ for $requests, $answers;
$answers->autoflush(1);

sub note { print STDERR join(' ', ($queue_id ? "$queue_id:" : ()), @_) =~ s/\n*\z/\n/r }

$SIG{__WARN__} = sub { note(@_) };

my %last;    # what the last server said to the plugin, {command, reply}
{
    no strict 'refs';
    no warnings 'redefine';

    # qpsmtpd's log, without its logging plugins (config/logging writes to qpsmtpd's own files)
    *Qpsmtpd::varlog = sub {
        my ($self, $level, @words) = @_;    # words: (text), (hook, text) or (hook, plugin, text...)
        note(grep { defined } @words) if $level <= LOGWARN;
    };

    # smtp-forward declines alike for a 554 and a 451 and drops the reply, which is what tells a
    # bounce from a retry: it is taken from Net::Cmd, which every Net::SMTP conversation goes
    # through.
    my %original = map { $_ => \&{"Net::Cmd::$_"} } qw(command dataend response);
    *Net::Cmd::command = sub { $last{command} = join(' ', @_[1 .. $#_]); goto &{$original{command}} };
    *Net::Cmd::dataend = sub { $last{command} = 'end of data'; goto &{$original{dataend}} };
    *Net::Cmd::response = sub {
        my @status = wantarray ? $original{response}->(@_) : scalar $original{response}->(@_);
        my $text = join(' ', $_[0]->message) =~ s/\s+/ /gr =~ s/ \z//r;
        $last{reply} = join(' ', $_[0]->code, $text || ());
        return wantarray ? @status : $status[0];
    };
}

package Qrouter::Qpsmtpd {    # the qpsmtpd the plugins see: no client, one transaction at a time
    our @ISA = ('Qpsmtpd');
    sub new { bless {_connection => Qpsmtpd::Connection->new}, shift }
    sub transaction { $_[0]{_transaction} }
    sub connection { $_[0]{_connection} }
    sub config {
        my ($self, $key, @rest) = @_;
        return $key eq 'me' ? $me : $self->SUPER::config($key, @rest);
    }
}

my $qp = Qrouter::Qpsmtpd->new;
my %queue_hooks;    # "dir\0line" => the queue hooks of that plugin line's instance

sub queue_hooks {
    my ($dir, $line) = @_;
    return $queue_hooks{"$dir\0$line"} //= do {
        my $hooks = $qp->hooks;    # qpsmtpd's table of every loaded plugin's hooks
        %$hooks = ();
        my $loaded = eval { $qp->_load_plugin($line, $dir); 1 };
        my $mine = $hooks->{queue} || [];
        %$hooks = ();
        die $@ unless $loaded;
        $mine;
    };
}

sub address {
    my ($text) = @_;
    utf8::encode($text);
    # as qpsmtpd parses MAIL FROM and RCPT TO; an address its grammar refuses (UTF-8), split at @
    return Qpsmtpd::Address->new("<$text>") // Qpsmtpd::Address->new($text);
}

sub transaction {
    my ($request, $message) = @_;
    my $transaction = Qpsmtpd::Transaction->new;
    $transaction->sender(address($request->{sender}));
    $transaction->recipients(map { address($_) } @{$request->{recipients}});

    # as data_respond: CRLF made LF, the header lines parsed into a Mail::Header, every line (the
    # header's too) written to the body, whose start is the empty line after the header
    my $header = Mail::Header->new(Modify => 0, MailFrom => 'COERCE');
    my @header_lines;
    my $in_header = 1;
    my $end_header = sub {
        $in_header = 0;
        $header->extract(\@header_lines);
        $transaction->header($header);
        $transaction->set_body_start;
    };
    for my $line (split /^/m, $$message) {
        $line =~ s/\r\n\z/\n/;
        $end_header->() if $in_header && $line eq "\n";
        push @header_lines, $line if $in_header;
        $transaction->body_write($line);
    }
    $end_header->() if $in_header;
    return $transaction;
}

sub run_queue {
    my ($hooks, $transaction) = @_;
    my @answer = (DECLINED);
    for my $hook (@$hooks) {    # as Qpsmtpd::run_continuation
        @answer = $hook->{code}->($qp, $transaction);
        $answer[0] //= DECLINED;
        last if $answer[0] != DECLINED;
    }
    return @answer;
}

sub answer {
    my ($request, $message) = @_;
    local $queue_id = $request->{id};
    %last = ();
    my ($rc, @text) = eval {
        my $hooks = queue_hooks(@$request{qw(dir line)});
        die "$request->{line}: the plugin has no queue hook\n" unless @$hooks;
        local $qp->{_transaction} = transaction($request, $message);
        run_queue($hooks, $qp->{_transaction});
    };
    my $error = $@ =~ s/\s+\z//r;
    return {
        rc      => $error ? undef : $name_of{$rc} // "$rc",
        message => join(' ', map { split /\n/ } grep { defined } @text) =~ s/\s+\z//r,
        error   => $error || undef,
        server  => defined $last{reply}
          ? {command => $last{command} // 'greeting', reply => $last{reply}}
          : undef,
    };
}

sub read_exactly {
    my ($size) = @_;
    my $data = '';
    while (length $data < $size) {
        my $got = read($requests, $data, $size - length $data, length $data);
        die "cannot read a request: $!\n" unless defined $got;
        return undef unless $got;
    }
    return $data;
}

sub read_frame {
    my $length = read_exactly(4) // return undef;
    return read_exactly(unpack('N', $length));
}

while (defined(my $request = read_frame())) {
    my $message = read_frame() // last;
    my $answer = $json->encode(answer($json->decode($request), \$message));
    print {$answers} pack('N', length $answer), $answer or die "cannot answer: $!\n";
}
