# The berth-registry job: its configuration, bpm and secrets, checked by rendering and by the real binary.
require_relative 'spec_helper'

RSpec.describe 'berth-registry job' do
  let(:job) { release_job('berth-registry') }
  let(:disk) { { 'persistent_disk' => 10_240 } }
  let(:tls) { BerthSpec.tls }
  let(:robot_password) { SecureRandom.hex(16) }
  let(:secure) do
    { 'berth' => { 'registry' => { 'tls' => tls }, 'cache' => { 'robot_password' => robot_password } } }
  end

  def config(properties, spec = disk, links: {})
    YAML.safe_load(job.render('config/berth-registry.yml', properties: properties, spec: spec, links: links))
  end

  # Installs the job rendered from `properties` and runs its pre-start (which runs the real
  # binary's `config check`); its output.
  def pre_start(properties, spec = disk)
    registry_pre_start(tmp, properties: properties, spec: spec)
  end

  def merge(base, extra)
    base.merge(extra) { |_, a, b| a.is_a?(Hash) && b.is_a?(Hash) ? merge(a, b) : b }
  end

  describe 'pull-through cache upstreams' do
    let(:hub) { { 'prefix' => 'hub', 'url' => 'https://registry-1.docker.io', 'docker_hub' => true } }
    let(:ghcr) do
      { 'prefix' => 'ghcr', 'url' => 'https://ghcr.io', 'username' => 'puller', 'password' => 'ghcr token',
        'ca' => 'GHCR CA PEM', 'revalidate_seconds' => 60 }
    end

    def with_upstreams(upstreams)
      merge(secure, 'berth' => { 'registry' => { 'proxy' => { 'upstreams' => upstreams } } })
    end

    it 'renders each upstream with its password in a file of its own, and lets anyone pull a mirror by name' do
      properties = with_upstreams([hub, ghcr])
      rendered = config(properties)
      expect(rendered['proxy']).to eq(
        [{ 'prefix' => 'hub', 'url' => 'https://registry-1.docker.io', 'docker_hub' => true },
         { 'prefix' => 'ghcr', 'url' => 'https://ghcr.io', 'docker_hub' => false, 'username' => 'puller',
           'password_file' => '/var/vcap/data/berth-registry/proxy/ghcr.password',
           'ca_file' => '/var/vcap/jobs/berth-registry/config/proxy-ca.pem', 'revalidate_seconds' => 60 }]
      )
      expect(rendered['auth']['access']).to include(
        { 'repositories' => 'hub', 'anonymous' => 'by-name', 'foreign_credentials_as_anonymous' => true },
        { 'repositories' => 'ghcr', 'anonymous' => 'by-name', 'foreign_credentials_as_anonymous' => true }
      )
      expect(YAML.dump(rendered)).not_to include('ghcr token')
      expect(job.render('config/proxy-passwords', properties: properties)).to eq("ghcr ghcr token\n")
      expect(job.render('config/proxy-ca.pem', properties: properties)).to eq("GHCR CA PEM\n")
      expect(config(secure)).not_to have_key('proxy')
      expect(job.render('config/proxy-passwords', properties: secure)).to eq('')
    end

    it 'refuses upstreams that would fail later' do
      {
        [hub.merge('prefix' => 'Hub')] => /prefix "Hub" must be one lowercase repository path component/,
        [hub.merge('prefix' => 'cache')] => /prefix cache is the cache namespace/,
        [hub, hub] => /prefix hub is listed twice/,
        [hub.merge('url' => 'registry-1.docker.io')] => /must start with https:/,
        [ghcr.merge('password' => nil)] => /username and password go together/,
        [hub.merge('token' => 'x')] => /unknown token/,
        [ghcr.merge('password' => "two\nlines")] => /spans lines/
      }.each do |upstreams, error|
        expect do
          config(with_upstreams(upstreams))
          job.render('config/proxy-passwords', properties: with_upstreams(upstreams))
        end.to raise_error(error)
      end
      own_rule = merge(with_upstreams([hub]), 'berth' => { 'registry' => { 'auth' => { 'access' => [{ 'repositories' => 'hub' }] } } })
      expect { config(own_rule) }.to raise_error(/the rule for the mirrored prefix "hub" is generated/)
    end

    it 'pre-start gives each password a file only the registry reads, which config check accepts' do
      root = tmp
      output = registry_pre_start(root, properties: with_upstreams([hub, ghcr.merge('ca' => tls['ca'])]), spec: disk)
      expect(output).to include('berth-registry.yml: ok')
      expect(output).not_to include('ghcr token')
      password = "#{root}/data/berth-registry/proxy/ghcr.password"
      expect(File.read(password)).to eq("ghcr token\n")
      expect(File.stat(password).mode & 0o777).to eq(0o600)
      expect(File.stat(File.dirname(password)).mode & 0o777).to eq(0o700)
      expect(File.stat("#{root}/jobs/berth-registry/config/proxy-passwords").mode & 0o777).to eq(0o600)
      expect(Dir.children(File.dirname(password))).to eq(['ghcr.password'])
    end
  end

  describe 'config/berth-registry.yml' do
    it 'refuses the defaults alone: token auth needs TLS' do
      expect { config({}) }.to raise_error(/auth.mode token sends passwords and tokens/)
    end

    it 'serves TLS with token auth and the cache namespace rule by default' do
      rendered = config(secure)
      expect(rendered).to eq(
        'listen' => '0.0.0.0:8443',
        'storage' => { 'root' => '/var/vcap/store/berth-registry' },
        'log' => { 'format' => 'json', 'level' => 'info' },
        'gc' => { 'interval_seconds' => 3600, 'grace_seconds' => 7200, 'untagged' => [] },
        'retention' => { 'track_pulls' => true,
                         'cache' => { 'enabled' => true, 'namespace' => 'cache', 'keep_stagings' => 3,
                                      'pulled_within_days' => 30 } },
        'tls' => { 'certificate' => '/var/vcap/jobs/berth-registry/config/tls.crt',
                   'private_key' => '/var/vcap/jobs/berth-registry/config/tls.key' },
        'auth' => {
          'mode' => 'token',
          'htpasswd' => '/var/vcap/data/berth-registry/htpasswd',
          'max_failures_per_minute' => 10,
          'access' => [{ 'repositories' => 'cache', 'anonymous' => 'by-name',
                         'foreign_credentials_as_anonymous' => true,
                         'grants' => { 'robot:berth-cacher' => ['push-by-name'] } }],
          'token' => { 'service' => 'berth-registry', 'issuer' => 'berth-registry', 'lifetime_seconds' => 300 }
        }
      )
    end

    it 'takes every override' do
      rendered = config(merge(secure, 'berth' => {
                                'registry' => {
                                  'listen_address' => '::', 'port' => 5000, 'log_level' => 'warn',
                                  'limits' => { 'max_page_entries' => 500, 'shutdown_grace_seconds' => 5,
                                                'body_timeout_seconds' => 30 },
                                  'gc' => { 'interval_seconds' => 0, 'grace_seconds' => 60, 'untagged' => ['ci'] },
                                  'auth' => {
                                    'mode' => 'basic', 'max_failures_per_minute' => 0,
                                    'users' => [{ 'name' => 'alice', 'password' => 'a' }],
                                    'groups' => { 'platform' => ['alice'] }, 'admins' => ['group:platform'],
                                    'access' => [{ 'repositories' => 'team-a', 'grants' => { 'authenticated' => ['pull'] } }]
                                  }
                                },
                                'cache' => { 'namespace' => 'mirror' }
                              }))
      expect(rendered['listen']).to eq('[::]:5000')
      expect(rendered['log']['level']).to eq('warn')
      expect(rendered['limits']).to eq('max_page_entries' => 500, 'shutdown_grace_seconds' => 5,
                                       'body_timeout_seconds' => 30)
      expect(rendered['gc']).to eq('interval_seconds' => 0, 'grace_seconds' => 60, 'untagged' => ['ci'])
      expect(rendered).not_to have_key('quotas')
      auth = rendered['auth']
      expect(auth).to include('mode' => 'basic', 'max_failures_per_minute' => 0,
                              'groups' => { 'platform' => ['alice'] }, 'admins' => ['group:platform'])
      expect(auth['access'].map { |rule| rule['repositories'] }).to eq(%w[team-a mirror])
      expect(auth).not_to have_key('token')
    end

    it "renders quotas, the cache namespace's own included, that the real registry accepts" do
      properties = merge(secure, 'berth' => {
                           'registry' => { 'quotas' => [{ 'repositories' => 'team', 'max_bytes' => '10GiB' }] },
                           'cache' => { 'quota' => { 'total' => '200GiB', 'per_app' => 5_368_709_120 } }
                         })
      expect(config(properties)['quotas']).to eq([{ 'repositories' => 'team', 'max_bytes' => '10GiB' },
                                                  { 'repositories' => 'cache', 'max_bytes' => '200GiB' },
                                                  { 'repositories' => 'cache/*', 'max_bytes' => 5_368_709_120 }])
      expect(pre_start(properties)).to include('berth-registry.yml: ok')
    end

    it 'keeps every image a staged droplet names when given a Cloud Controller, and the real registry accepts it' do
      properties = merge(secure, 'berth' => {
                           'registry' => { 'retention' => {
                             'cache' => { 'keep_stagings' => 5, 'pulled_within_days' => 7 },
                             'rules' => [{ 'repositories' => 'ci', 'tags' => 'pr-*', 'keep_last' => 10 }],
                             'cloud_controller' => { 'api_url' => 'https://api.sys.example.com',
                                                     'uaa_url' => 'https://uaa.service.cf.internal:8443',
                                                     'client_secret' => 'cc-secret', 'ca' => tls['ca'] }
                           } },
                           'cache' => { 'namespace' => 'mirror' }
                         })
      retention = config(properties)['retention']
      expect(retention).to eq(
        'track_pulls' => true,
        'cache' => { 'enabled' => true, 'namespace' => 'mirror', 'keep_stagings' => 5, 'pulled_within_days' => 7 },
        'rules' => [{ 'repositories' => 'ci', 'tags' => 'pr-*', 'keep_last' => 10 }],
        'cloud_controller' => { 'api_url' => 'https://api.sys.example.com', 'uaa_url' => 'https://uaa.service.cf.internal:8443',
                                'client_id' => 'berth_registry',
                                'client_secret_file' => '/var/vcap/jobs/berth-registry/config/cc-client-secret',
                                'ca_file' => '/var/vcap/jobs/berth-registry/config/cc-ca.pem' }
      )
      expect(job.render('config/cc-client-secret', properties: properties)).to eq('cc-secret')
      expect(pre_start(properties)).to include('berth-registry.yml: ok')
      without_secret = merge(properties, 'berth' => { 'registry' => { 'retention' => { 'cloud_controller' => { 'client_secret' => nil } } } })
      expect { config(without_secret) }.to raise_error(/needs cloud_controller.client_secret/)
    end

    it 'points at the token signing key only when one is given' do
      rendered = config(merge(secure, 'berth' => { 'registry' => { 'auth' => { 'token' => {
                                'signing_key' => 'PEM', 'lifetime_seconds' => 60, 'issuer' => 'i', 'service' => 's'
                              } } } }))
      expect(rendered['auth']['token']).to eq(
        'service' => 's', 'issuer' => 'i', 'lifetime_seconds' => 60,
        'signing_key' => '/var/vcap/jobs/berth-registry/config/token-signing-key.pem'
      )
    end

    context 'with instance identity' do
      let(:identity_ca) { BerthSpec.instance_identity_ca }
      let(:with_identity) do
        { 'berth' => { 'registry' => { 'tls' => tls },
                       'cache' => { 'instance_identity' => { 'ca_certificates' => [identity_ca['certificate'], identity_ca['ca']] } } } }
      end

      it 'binds each app to its own repositories, needs no robot, and trusts the bundle' do
        rendered = config(with_identity)
        expect(rendered['auth']['access']).to eq([{ 'repositories' => 'cache/{app}', 'anonymous' => 'by-name',
                                                    'foreign_credentials_as_anonymous' => true,
                                                    'grants' => { 'app:{app}' => ['push-by-name'] } }])
        expect(rendered['auth']['instance_identity']).to eq('ca_file' => '/var/vcap/jobs/berth-registry/config/instance-identity-ca.pem')
        expect(job.render('config/instance-identity-ca.pem', properties: with_identity))
          .to eq(identity_ca['certificate'] + identity_ca['ca'])
        expect(job.render('config/passwords', properties: with_identity)).to eq('')
      end

      it 'keeps the robot beside the apps while a foundation moves over' do
        rendered = config(merge(with_identity, 'berth' => { 'cache' => { 'robot_password' => 'x' } }))
        expect(rendered['auth']['access'].last['grants']).to eq('app:{app}' => ['push-by-name'],
                                                                 'robot:berth-cacher' => ['push-by-name'])
      end

      it 'refuses access control off, a rule of its own for cache/{app}, and a bundle that is no PEM' do
        expect { config(merge(with_identity, 'berth' => { 'registry' => { 'auth' => { 'mode' => 'none' } } })) }
          .to raise_error(/instance_identity needs berth.registry.auth.mode basic or token/)
        expect { config(merge(with_identity, 'berth' => { 'registry' => { 'auth' => { 'access' => [{ 'repositories' => 'cache/{app}' }] } } })) }
          .to raise_error(/rule for the cache namespace "cache" is generated/)
        expect { job.render('config/instance-identity-ca.pem', properties: { 'berth' => { 'cache' => { 'instance_identity' => { 'ca_certificates' => ['x'] } } } }) }
          .to raise_error(/ca_certificates\[0\] is not a PEM certificate/)
      end

      it 'renders a configuration the real berth-registry accepts' do
        expect(pre_start(with_identity)).to include('berth-registry.yml: ok')
        expect(File.read("#{tmp}/data/berth-registry/htpasswd")).to eq('')
      end
    end

    it 'leaves the cache rule out when caching is off, and then needs no robot password' do
      rendered = config({ 'berth' => { 'registry' => { 'tls' => tls }, 'cache' => { 'enabled' => false } } })
      expect(rendered['auth']).not_to have_key('access')
    end

    it 'can run open and plain for a lab' do
      rendered = config({ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'none' } } } })
      expect(rendered['auth']).to eq('mode' => 'none')
      expect(rendered).not_to have_key('tls')
    end

    {
      'token mode without TLS' => [{ 'berth' => { 'cache' => { 'robot_password' => 'x' } } },
                                   /auth.mode token sends passwords and tokens.*tls.certificate/],
      'basic mode without TLS' => [{ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'basic' } },
                                                  'cache' => { 'robot_password' => 'x' } } },
                                   /auth.mode basic sends passwords/],
      'a certificate without its key' => [{ 'berth' => { 'registry' => { 'tls' => { 'certificate' => 'C' } } } },
                                          /tls.certificate and berth.registry.tls.private_key go together/],
      'caching without the robot password' => [{ 'berth' => { 'registry' => { 'tls' => { 'certificate' => 'C', 'private_key' => 'K' } } } },
                                               /berth.cache.robot_password is required/],
      'an unknown auth mode' => [{ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'ldap' } } } },
                                 /must be none, basic or token/],
      'users without auth' => [{ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'none', 'users' => [{ 'name' => 'a', 'password' => 'b' }] } } } },
                               /mode none lets everyone do everything/],
      'a rule of its own for the cache namespace' => [
        { 'berth' => { 'registry' => { 'tls' => { 'certificate' => 'C', 'private_key' => 'K' },
                                       'auth' => { 'access' => [{ 'repositories' => 'cache' }] } },
                       'cache' => { 'robot_password' => 'x' } } },
        /rule for the cache namespace "cache" is generated/
      ],
      'an unknown limit' => [{ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'none' }, 'limits' => { 'max_blob' => 1 } } } },
                             /unknown max_blob/],
      'a namespace with a slash' => [{ 'berth' => { 'registry' => { 'auth' => { 'mode' => 'none' } }, 'cache' => { 'namespace' => 'a/b' } } },
                                     /one lowercase repository path component/],
      'a misspelt property' => [{ 'berth' => { 'registry' => { 'prot' => 1 } } }, /'berth.registry.prot' is not declared/]
    }.each do |what, (properties, message)|
      it "refuses #{what}" do
        expect { config(properties) }.to raise_error(message)
      end
    end

    it 'refuses an instance group without a persistent disk' do
      expect { config(secure, {}) }.to raise_error(/on the persistent disk: give the instance group one/)
    end

    # The director sends persistent_disk: 0 without a disk, the size with persistent_disk or
    # persistent_disk_type, and no persistent_disk at all for named persistent_disks.
    it 'accepts an instance group with named persistent_disks' do
      expect(config(secure, { 'persistent_disk' => nil })['storage']).to eq('root' => '/var/vcap/store/berth-registry')
    end
  end

  describe 'shared storage and database' do
    let(:config_dir) { '/var/vcap/jobs/berth-registry/config' }
    let(:no_disk) { { 'persistent_disk' => 0 } }
    let(:signing_key) { OpenSSL::PKey::EC.generate('prime256v1').private_to_pem }
    let(:backends) do
      {
        's3' => { 'bucket' => 'berth', 'endpoint' => 'https://s3.example.internal:9000', 'path_style' => true,
                  'access_key_id' => 'AKID', 'secret_access_key' => 'SECRET-S3', 'ca' => tls['ca'], 'prefix' => 'registry/' },
        'azure' => { 'account' => 'berthaccount', 'container' => 'berth', 'access_key' => 'SECRET-AZURE' },
        'gcs' => { 'bucket' => 'berth', 'service_account_json' => '{"type": "service_account"}' },
        'webdav' => { 'url' => 'https://blobstore.service.cf.internal:4443/admin/berth-registry', 'username' => 'blobstore-user',
                      'password' => 'SECRET-DAV', 'ca' => tls['ca'] }
      }
    end
    let(:rendered_backends) do
      {
        's3' => { 'bucket' => 'berth', 'endpoint' => 'https://s3.example.internal:9000', 'region' => 'us-east-1', 'path_style' => true,
                  'access_key_id' => 'AKID', 'prefix' => 'registry/',
                  'secret_access_key_file' => "#{config_dir}/storage-credential", 'ca_file' => "#{config_dir}/storage-ca.pem" },
        'azure' => { 'account' => 'berthaccount', 'container' => 'berth', 'access_key_file' => "#{config_dir}/storage-credential" },
        'gcs' => { 'bucket' => 'berth', 'service_account_file' => "#{config_dir}/storage-credential" },
        'webdav' => { 'url' => 'https://blobstore.service.cf.internal:4443/admin/berth-registry', 'username' => 'blobstore-user',
                      'password_file' => "#{config_dir}/storage-credential", 'ca_file' => "#{config_dir}/storage-ca.pem" }
      }
    end
    let(:postgres) do
      { 'type' => 'postgres', 'host' => 'db.example.internal', 'password' => 'SECRET-DB', 'tls' => { 'ca' => tls['ca'] } }
    end

    def storage(backend, extra = {})
      merge(secure, 'berth' => { 'registry' => { 'storage' => { 'backend' => backend, backend => backends.fetch(backend) }.merge(extra) } })
    end

    # A shared database needs the one signing key every instance verifies tokens with; these
    # examples give it (the refusal without one is checked below).
    def with_database(properties, database)
      shared = database['type'] && database['type'] != 'sqlite'
      key = shared ? { 'auth' => { 'token' => { 'signing_key' => signing_key } } } : {}
      merge(properties, 'berth' => { 'registry' => { 'database' => database }.merge(key) })
    end

    def peers(count)
      { 'peers' => { 'instances' => Array.new(count) { |i| { 'index' => i, 'address' => "b#{i}.berth-registry.bosh" } } } }
    end

    def bpm(properties)
      YAML.safe_load(job.render('config/bpm.yml', properties: properties))['processes'].first
    end

    %w[s3 azure gcs webdav].each do |backend|
      it "keeps blobs on #{backend}, its secret in a private file, in a configuration the real berth-registry accepts" do
        properties = storage(backend)
        rendered = config(properties)
        expect(rendered['storage']).to eq('root' => '/var/vcap/store/berth-registry', 'content' => { backend => rendered_backends.fetch(backend) })
        secret = backends.fetch(backend).values_at('secret_access_key', 'access_key', 'service_account_json', 'password').compact.first
        expect(job.render('config/storage-credential', properties: properties)).to eq(secret)
        expect(job.render('config/storage-ca.pem', properties: properties)).to eq(%w[s3 webdav].include?(backend) ? tls['ca'] : '')
        expect(pre_start(properties)).to include('berth-registry.yml: ok')
        expect(File.stat("#{tmp}/jobs/berth-registry/config/storage-credential").mode & 0o777).to eq(0o600)
        expect(bpm(properties)['persistent_disk']).to be(true), 'SQLite still keeps the metadata on the disk'
      end
    end

    it 'leaves credentials out for the instance profile or default credentials, and writes no secret' do
      properties = merge(secure, 'berth' => { 'registry' => { 'storage' => { 'backend' => 's3', 's3' => { 'bucket' => 'b', 'region' => 'eu-west-1' } } } })
      expect(config(properties)['storage']['content']).to eq('s3' => { 'bucket' => 'b', 'region' => 'eu-west-1', 'path_style' => false })
      expect(job.render('config/storage-credential', properties: properties)).to eq('')
      expect(pre_start(properties)).to include('berth-registry.yml: ok')
    end

    it 'keeps a local copy of served blobs only in front of an object store that does not redirect' do
      properties = storage('webdav', 'blob_cache' => '4GiB')
      expect(config(properties)['storage']['blob_cache']).to eq('4GiB')
      expect(pre_start(properties)).to include('berth-registry.yml: ok')
      expect { config(merge(secure, 'berth' => { 'registry' => { 'storage' => { 'blob_cache' => '4GiB' } } })) }
        .to raise_error(/blob_cache needs a storage.backend other than filesystem/)
      expect { config(storage('s3', 'blob_cache' => '4GiB', 'redirect_seconds' => 60)) }
        .to raise_error(/blob_cache and redirect_seconds exclude each other/)
      expect(config(storage('s3'))['storage']).not_to have_key('blob_cache')
    end

    it 'redirects blob GETs to signed URLs only where the store signs them' do
      properties = storage('s3', 'redirect_seconds' => 300)
      expect(config(properties)['storage']['redirect_seconds']).to eq(300)
      expect(pre_start(properties)).to include('berth-registry.yml: ok')
      expect { config(storage('webdav', 'redirect_seconds' => 300)) }
        .to raise_error(/redirect_seconds needs storage.backend s3, azure or gcs, which sign URLs; webdav cannot/)
      expect { config(merge(secure, 'berth' => { 'registry' => { 'storage' => { 'redirect_seconds' => 60 } } })) }
        .to raise_error(/filesystem cannot/)
    end

    {
      'an unknown backend' => [{ 'backend' => 'ftp' }, /storage.backend must be filesystem, s3, azure, gcs, webdav, not "ftp"/],
      'a bucket missing' => [{ 'backend' => 's3', 's3' => { 'region' => 'x' } }, /backend s3 needs storage.s3.bucket/],
      'an Azure container missing' => [{ 'backend' => 'azure', 'azure' => { 'account' => 'a' } }, /backend azure needs storage.azure.container/],
      'a WebDAV URL missing' => [{ 'backend' => 'webdav' }, /backend webdav needs storage.webdav.url/],
      'an access key without its secret' => [{ 'backend' => 's3', 's3' => { 'bucket' => 'b', 'access_key_id' => 'AKID' } },
                                             /s3.access_key_id and secret_access_key go together/],
      'a WebDAV password without a user' => [{ 'backend' => 'webdav', 'webdav' => { 'url' => 'https://dav', 'password' => 'p' } },
                                            /webdav.username and password go together/]
    }.each do |what, (storage, message)|
      it "refuses #{what}" do
        expect { config(merge(secure, 'berth' => { 'registry' => { 'storage' => storage } })) }.to raise_error(message)
      end
    end

    %w[postgres mysql].each do |type|
      it "keeps metadata in #{type}, its password and CA in files" do
        properties = with_database(secure, postgres.merge('type' => type))
        expect(config(properties)['storage']).to eq(
          'root' => '/var/vcap/store/berth-registry',
          'metadata' => { type => { 'host' => 'db.example.internal', 'database' => 'berth', 'username' => 'berth',
                                    'password_file' => "#{config_dir}/database-password",
                                    'tls' => { 'mode' => 'verify-full', 'ca_file' => "#{config_dir}/database-ca.pem" },
                                    'pool_size' => 10, 'statement_timeout_seconds' => 30, 'connect_timeout_seconds' => 5 } }
        )
        expect(job.render('config/database-password', properties: properties)).to eq('SECRET-DB')
        expect(job.render('config/database-ca.pem', properties: properties)).to eq(tls['ca'])
        expect(bpm(properties)['persistent_disk']).to be(true), 'the filesystem backend keeps the blobs on the disk'
      end
    end

    it 'takes every database override' do
      properties = with_database(secure, 'type' => 'mysql', 'host' => 'sql-db.service.cf.internal', 'port' => 13_306,
                                         'name' => 'registry', 'username' => 'reg', 'tls' => { 'mode' => 'require' },
                                         'pool_size' => 4, 'statement_timeout_seconds' => 10, 'connect_timeout_seconds' => 2)
      expect(config(properties)['storage']['metadata']).to eq(
        'mysql' => { 'host' => 'sql-db.service.cf.internal', 'port' => 13_306, 'database' => 'registry', 'username' => 'reg',
                     'tls' => { 'mode' => 'require' }, 'pool_size' => 4, 'statement_timeout_seconds' => 10,
                     'connect_timeout_seconds' => 2 }
      )
    end

    {
      'an unknown database type' => [{ 'type' => 'oracle' }, /database.type must be sqlite, postgres or mysql, not "oracle"/],
      'a database without a host' => [{ 'type' => 'postgres' }, /database.type postgres needs berth.registry.database.host/],
      'an unknown TLS mode' => [{ 'type' => 'mysql', 'host' => 'h', 'tls' => { 'mode' => 'prefer' } }, /tls.mode must be verify-full, require or disable/],
      'a CA that nothing checks' => [{ 'type' => 'mysql', 'host' => 'h', 'tls' => { 'mode' => 'require', 'ca' => 'PEM' } },
                                     /database.tls.ca is used only with tls.mode verify-full/]
    }.each do |what, (database, message)|
      it "refuses #{what}" do
        expect { config(with_database(secure, database)) }.to raise_error(message)
      end
    end

    it 'renders shared metadata configurations the real berth-registry accepts, its password private' do
      %w[postgres mysql].each do |type|
        expect(pre_start(with_database(storage('webdav'), postgres.merge('type' => type)), no_disk)).to include('berth-registry.yml: ok')
        expect(File.stat("#{tmp}/jobs/berth-registry/config/database-password").mode & 0o777).to eq(0o600)
      end
    end

    it 'needs no persistent disk with nothing local, and keeps its root on the ephemeral disk' do
      properties = with_database(storage('webdav'), postgres)
      expect(config(properties, no_disk)['storage']['root']).to eq('/var/vcap/data/berth-registry/root')
      expect(bpm(properties)).not_to have_key('persistent_disk')
      expect(bpm(properties)['ephemeral_disk']).to be(true)
    end

    it 'still needs the disk for whatever stays local' do
      expect { config(storage('s3'), no_disk) }.to raise_error(/keeps its database.type sqlite data on the persistent disk/)
      expect { config(with_database(secure, postgres), no_disk) }
        .to raise_error(/keeps its storage.backend filesystem data on the persistent disk/)
    end

    describe 'with several instances (the peers link)' do
      let(:shared) { merge(with_database(storage('webdav'), postgres), 'berth' => { 'registry' => { 'auth' => { 'token' => { 'signing_key' => signing_key } } } }) }

      it 'accepts shared storage, a shared database and one signing key' do
        expect(config(shared, no_disk, links: peers(3))['storage']['content']).to have_key('webdav')
        expect(job.render('config/token-signing-key.pem', properties: shared)).to eq(signing_key)
      end

      it 'refuses anything kept on one VM' do
        expect { config(storage('webdav'), disk, links: peers(2)) }
          .to raise_error(/has 2 instances but berth.registry.database.type sqlite keeps data on one VM/)
        expect { config(secure, disk, links: peers(2)) }
          .to raise_error(/berth.registry.storage.backend filesystem and berth.registry.database.type sqlite keeps data on one VM/)
      end

      it 'refuses token auth with a key each instance would generate for itself' do
        without_key = merge(storage('webdav'), 'berth' => { 'registry' => { 'database' => postgres } })
        [1, 2].each do |count|
          expect { config(without_key, no_disk, links: peers(count)) }
            .to raise_error(/database.type postgres is shared by every instance: set berth.registry.auth.token.signing_key/)
        end
        basic = merge(without_key, 'berth' => { 'registry' => { 'auth' => { 'mode' => 'basic' } } })
        expect(config(basic, no_disk, links: peers(2))['auth']['mode']).to eq('basic')
      end
    end
  end

  describe 'config/passwords' do
    def passwords(users)
      job.render('config/passwords', properties: merge(secure, 'berth' => { 'registry' => { 'auth' => { 'users' => users } } }))
    end

    it 'lists the users and the cacher robot, one per line' do
      expect(passwords([{ 'name' => 'alice', 'password' => 'p:w d' }]))
        .to eq("alice:p:w d\nrobot$berth-cacher:#{robot_password}\n")
    end

    {
      'a reserved robot name' => [[{ 'name' => 'robot$x', 'password' => 'SECRET-1' }], /robot\$ are reserved/],
      'a colon in a name' => [[{ 'name' => 'a:b', 'password' => 'SECRET-1' }], /may not contain ':'/],
      'a line break in a password' => [[{ 'name' => 'a', 'password' => "SECRET-1\nSECRET-2" }], /password of a contains a line break/],
      'a user twice' => [[{ 'name' => 'a', 'password' => 'SECRET-1' }, { 'name' => 'a', 'password' => 'SECRET-2' }], /a appears twice/],
      'a user without a password' => [[{ 'name' => 'a' }], /needs a name and a password/]
    }.each do |what, (users, message)|
      it "refuses #{what} without showing any password" do
        expect { passwords(users) }.to raise_error(message) { |e| expect(e.message).not_to include('SECRET') }
      end
    end
  end

  describe 'config/bpm.yml' do
    it 'runs the registry from the package with its configuration and the persistent disk' do
      bpm = YAML.safe_load(job.render('config/bpm.yml', properties: secure))
      expect(bpm).to eq('processes' => [{
                          'name' => 'berth-registry',
                          'executable' => '/var/vcap/packages/berth/bin/berth-registry',
                          'args' => ['serve', '--config', '/var/vcap/jobs/berth-registry/config/berth-registry.yml'],
                          'persistent_disk' => true,
                          'ephemeral_disk' => true,
                          'limits' => { 'open_files' => 65_536 }
                        }])
    end

    it 'may bind a privileged port' do
      bpm = YAML.safe_load(job.render('config/bpm.yml', properties: { 'berth' => { 'registry' => { 'port' => 443 } } }))
      expect(bpm['processes'][0]['capabilities']).to eq(['NET_BIND_SERVICE'])
    end
  end

  # bpm runs the process in a mount namespace holding only these directories of /var/vcap: every
  # file the process opens (its configuration and each path that names) must lie under one.
  describe 'under bpm' do
    def mounts(job_name, process, packages)
      dirs = ["/var/vcap/jobs/#{job_name}", "/var/vcap/sys/log/#{job_name}", "/var/vcap/sys/run/#{job_name}",
              "/var/vcap/data/#{job_name}/tmp"] + packages.map { |p| "/var/vcap/packages/#{p}" }
      dirs << "/var/vcap/data/#{job_name}" if process['ephemeral_disk']
      dirs << "/var/vcap/store/#{job_name}" if process['persistent_disk']
      dirs + (process['additional_volumes'] || []).map { |v| v.fetch('path') }
    end

    def paths_in(node)
      case node
      when Hash then node.values.flat_map { |v| paths_in(v) }
      when Array then node.flat_map { |v| paths_in(v) }
      when %r{\A/} then [node]
      else []
      end
    end

    shared = { 'storage' => { 'backend' => 'webdav', 'webdav' => { 'url' => 'https://dav.example/berth', 'username' => 'u', 'password' => 'p', 'ca' => 'PEM' } },
               'database' => { 'type' => 'mysql', 'host' => 'db.example', 'password' => 'p', 'tls' => { 'ca' => 'PEM' } } }
    { 'on the persistent disk' => [{}, { 'persistent_disk' => 10_240 }, '/var/vcap/store/berth-registry'],
      'with shared storage and database' => [shared, { 'persistent_disk' => 0 }, '/var/vcap/data/berth-registry/root'] }
      .each do |where, (registry, spec, root)|
      it "reaches every file its configuration names, #{where}" do
        properties = merge(secure, 'berth' => { 'registry' => merge(registry, 'auth' => {
                                                                      'users' => [{ 'name' => 'alice', 'password' => 'a' }],
                                                                      'token' => { 'signing_key' => 'PEM' }
                                                                    }) })
        process = YAML.safe_load(job.render('config/bpm.yml', properties: properties))['processes'].first
        visible = mounts(job.name, process, job.spec.fetch('packages'))
        config_path = process['args'][process['args'].index('--config') + 1]
        config_file = job.templates.key(config_path.delete_prefix("/var/vcap/jobs/#{job.name}/"))
        expect(config_file).not_to be_nil, "#{config_path} is not one of the job's templates"
        named = [process['executable'], config_path] + paths_in(config(properties, spec))
        expect(named).to include(root, a_string_ending_with('htpasswd'))
        named.each do |path|
          expect(job.templates.value?(path.delete_prefix("/var/vcap/jobs/#{job.name}/"))).to be(true), "#{path} is no template" if path.start_with?('/var/vcap/jobs/')
          expect(visible.any? { |dir| path == dir || path.start_with?("#{dir}/") }).to be(true), "#{path} is outside bpm's mounts #{visible}"
        end
      end
    end
  end

  it 'renders the TLS files from their properties' do
    expect(job.render('config/tls.crt', properties: secure)).to eq(tls['certificate'])
    expect(job.render('config/tls.key', properties: secure)).to eq(tls['private_key'])
  end

  describe 'bin/pre-start, with the real berth-registry' do
    let(:root) { tmp }
    let(:users) { [{ 'name' => 'alice', 'password' => 'alice secret' }] }
    let(:properties) do
      merge(secure, 'berth' => { 'registry' => { 'auth' => { 'users' => users, 'admins' => ['user:alice'] } } })
    end
    let(:env) do
      { 'BERTH_JOB_DIR' => "#{root}/jobs/berth-registry", 'BERTH_DATA_DIR' => "#{root}/data/berth-registry",
        'BERTH_PACKAGE_DIR' => install_package(root), 'BERTH_OWNER' => owner }
    end

    before { install_job(root, 'berth-registry', properties: properties, spec: disk) }

    it 'hashes every password into a private htpasswd that config check accepts' do
      output = run!(env, "#{root}/jobs/berth-registry/bin/pre-start")
      expect(output).to include('berth-registry.yml: ok')
      expect(output).not_to include('alice secret', robot_password)

      htpasswd = "#{root}/data/berth-registry/htpasswd"
      expect(File.stat(htpasswd).mode & 0o777).to eq(0o600)
      entries = File.read(htpasswd).lines.map { |line| line.chomp.split(':', 2) }
      expect(entries.map(&:first)).to eq(['alice', 'robot$berth-cacher'])
      expect(entries.map(&:last)).to all(match(/\A\$2[aby]\$\d\d\$.{53}\z/))
      expect(File.read(htpasswd)).not_to include('alice secret', robot_password)

      %w[passwords tls.key token-signing-key.pem].each do |secret|
        expect(File.stat("#{root}/jobs/berth-registry/config/#{secret}").mode & 0o777).to eq(0o600)
      end
    end

    it 'renders a configuration the real berth-registry accepts' do
      run!(env, "#{root}/jobs/berth-registry/bin/pre-start")
      config = "#{root}/jobs/berth-registry/config/berth-registry.yml"
      expect(run!({}, BerthSpec.binary('BERTH_REGISTRY_BIN'), 'config', 'check', config)).to include('ok')
    end

    it 'fails when the htpasswd command does not produce a bcrypt entry' do
      fake = File.join(root, 'fake-package')
      FileUtils.mkdir_p("#{fake}/bin")
      File.write("#{fake}/bin/berth-registry", "#!/bin/sh\ncat >/dev/null\necho \"$2:plain\"\n")
      File.chmod(0o755, "#{fake}/bin/berth-registry")
      _, err, status = Open3.capture3(env.merge('BERTH_PACKAGE_DIR' => fake), "#{root}/jobs/berth-registry/bin/pre-start")
      expect(status).not_to be_success
      expect(err).to include('did not print a bcrypt entry for alice')
      expect(File).not_to exist("#{root}/data/berth-registry/htpasswd")
    end
  end
end
