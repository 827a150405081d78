# The standalone manifest and the cf-deployment ops file: they apply, and the jobs render from what they set.
require_relative 'spec_helper'

RSpec.describe 'manifests' do
  let(:tls) { BerthSpec.tls }
  let(:identity_ca) { BerthSpec.instance_identity_ca }
  let(:vars) do
    { 'berth_release_version' => '1.0.0', 'berth_registry_ip' => '10.0.1.50', 'registry_name' => 'registry.example.internal',
      'berth_registry_tls' => tls, 'berth_cacher_password' => 'robot-pw', 'berth_admin_password' => 'admin-pw',
      'diego_instance_identity_ca' => identity_ca, 'cc_db_encryption_key' => 'k',
      'system_domain' => 'sys.example.com', 'berth_registry_uaa_client_secret' => 'uaa-client-pw',
      'router_ssl' => { 'ca' => tls['ca'] }, 'uaa_ssl' => { 'ca' => tls['ca'] } }
  end

  def load(path)
    YAML.safe_load(File.read(File.join(BerthSpec::REPO, path)), aliases: true)
  end

  def group(manifest, name)
    manifest['instance_groups'].find { |g| g['name'] == name } or raise "no instance group #{name}"
  end

  def job_in(manifest, group, name)
    group(manifest, group)['jobs'].find { |j| j['name'] == name } or raise "no job #{name} on #{group}"
  end

  describe 'the link the director computes' do
    it 'fails, as a deploy does, on a ((variable)) where a hash of provided properties is needed' do
      expect { provided_link('berth-registry', { 'berth' => { 'registry' => { 'tls' => '((berth_registry_tls))' } } }, vars) }
        .to raise_error(NoMethodError, /undefined method `key\?' for "\(\(berth_registry_tls\)\)":String/)
    end

    it 'interpolates leaf variables afterwards and fills what is not set from the spec' do
      raw = { 'berth' => { 'registry' => { 'tls' => { 'certificate' => '((berth_registry_tls.certificate))' } } } }
      expect(provided_link('berth-registry', raw, vars)['properties']).to eq(
        'berth' => { 'registry' => { 'port' => 8443, 'external_name' => nil, 'tls' => { 'certificate' => tls['certificate'], 'ca' => nil } },
                     'cache' => { 'enabled' => true, 'namespace' => 'cache', 'robot_password' => nil,
                                  'instance_identity' => { 'ca_certificates' => [] } } }
      )
    end
  end

  describe 'operations/enable-berth-cache.yml on cf-deployment' do
    let(:ops) { load('manifests/operations/enable-berth-cache.yml') }
    let(:stub) { load('bosh-release/spec/fixtures/cf-deployment-stub.yml') }
    let(:manifest) { GoPatch.apply(stub, ops) }
    let(:registry_job) { job_in(manifest, 'berth-registry', 'berth-registry') }
    let(:registry_properties) { interpolate(registry_job['properties'], vars) }
    let(:registry_link) { provided_link('berth-registry', registry_job['properties'], vars) }
    let(:name) { registry_properties['berth']['registry']['external_name'] }
    let(:port) { registry_properties['berth']['registry']['port'] }

    it 'adds the release and a registry instance group with a static IP and a persistent disk' do
      expect(manifest['releases']).to include('name' => 'berth', 'version' => '((berth_release_version))')
      registry = group(manifest, 'berth-registry')
      expect(registry['networks']).to eq([{ 'name' => 'default', 'static_ips' => ['((berth_registry_ip))'] }])
      expect(registry['persistent_disk_type']).to eq('100GB')
      expect(registry['instances']).to eq(1)
      expect(registry_job).to include('release' => 'berth', 'provides' => { 'berth-registry' => { 'as' => 'berth-registry' } })
      expect(job_in(manifest, 'berth-registry', 'berth-registry-gc')).to eq('name' => 'berth-registry-gc', 'release' => 'berth')
    end

    it 'renders a registry configuration from what it sets' do
      config = YAML.safe_load(release_job('berth-registry').render('config/berth-registry.yml', properties: registry_properties,
                                                                                                 spec: { 'persistent_disk' => 102_400 }))
      expect(config['listen']).to eq('0.0.0.0:8443')
      expect(config['auth']['mode']).to eq('token')
      expect(config['auth']['access']).to eq([{ 'repositories' => 'cache/{app}', 'anonymous' => 'by-name',
                                                'foreign_credentials_as_anonymous' => true,
                                                'grants' => { 'app:{app}' => ['push-by-name'] } },
                                              { 'repositories' => 'hub', 'anonymous' => 'by-name',
                                                'foreign_credentials_as_anonymous' => true }])
      expect(config['proxy']).to eq([{ 'prefix' => 'hub', 'url' => 'https://registry-1.docker.io', 'docker_hub' => true }])
      expect(config['auth']['instance_identity']).to eq('ca_file' => '/var/vcap/jobs/berth-registry/config/instance-identity-ca.pem')
      bundle = release_job('berth-registry').render('config/instance-identity-ca.pem', properties: registry_properties)
      expect(bundle).to eq(identity_ca['certificate'] + identity_ca['ca'])
    end

    it "gives the registry a read-only UAA client and Cloud Controller's address for retention" do
      client = group(manifest, 'uaa')['jobs'][0]['properties']['uaa']['clients']
      expect(client['berth_registry']).to eq('authorized-grant-types' => 'client_credentials',
                                             'authorities' => 'cloud_controller.global_auditor',
                                             'secret' => '((berth_registry_uaa_client_secret))')
      expect(client).to have_key('cc_routing')
      config = YAML.safe_load(release_job('berth-registry').render('config/berth-registry.yml', properties: registry_properties,
                                                                                                 spec: { 'persistent_disk' => 102_400 }))
      expect(config['retention']['cloud_controller']).to include('api_url' => 'https://api.sys.example.com',
                                                                 'uaa_url' => 'https://uaa.service.cf.internal:8443',
                                                                 'client_id' => 'berth_registry')
      expect(release_job('berth-registry').render('config/cc-client-secret', properties: registry_properties)).to eq('uaa-client-pw')
      expect(manifest['variables'].find { |v| v['name'] == 'berth_registry_uaa_client_secret' }).to include('type' => 'password')
    end

    it 'colocates berth-lifecycle with file_server, wired to the registry link' do
      lifecycle = job_in(manifest, 'api', 'berth-lifecycle')
      expect(job_in(manifest, 'api', 'file_server')).to be_truthy
      expect(lifecycle['consumes']).to eq('berth-registry' => { 'from' => 'berth-registry' })
      config = YAML.safe_load(release_job('berth-lifecycle').render('config/berth-cacher.yml',
                                                                    properties: interpolate(lifecycle.fetch('properties', {}), vars),
                                                                    links: { 'berth-registry' => registry_link }))
      expect(config['registry']).to eq('url' => "https://#{name}:#{port}", 'ca_file' => '/tmp/lifecycle/berth-registry-ca.pem',
                                        'identity' => 'instance')
      expect(config).not_to have_key('repository_key')
      # Public Docker Hub images are read through the registry's hub/ mirror.
      expect(config['proxies']).to eq('docker.io' => 'hub')
    end

    capi_jobs = [%w[api cloud_controller_ng], %w[cc-worker cloud_controller_worker],
                 %w[scheduler cloud_controller_clock], %w[scheduler cc_deployment_updater]]

    it "points all four capi jobs' docker lifecycle at the repacked bundle, keeping every other lifecycle" do
      bundle = "#{release_job('berth-lifecycle').spec['properties']['berth.lifecycle.bundle_name']['default']}/docker_app_lifecycle.tgz"
      capi_jobs.each do |ig, job|
        before = job_in(stub, ig, job)['properties']['cc']['diego']['lifecycle_bundles'].dup
        expect(before.keys).to include('cnb/cflinuxfs4'), 'the stub carries what cf-deployment sets'
        after = job_in(manifest, ig, job)['properties']['cc']['diego']['lifecycle_bundles']
        expect(after).to eq(before.merge('docker' => bundle)), "#{ig}/#{job}"
      end
      expect(job_in(manifest, 'api', 'cloud_controller_ng')['properties']['cc']['diego']['docker_staging_stack']).to eq('cflinuxfs4')
    end

    it 'fails loudly where cf-deployment no longer sets the lifecycle bundles' do
      job_in(stub, 'scheduler', 'cc_deployment_updater')['properties']['cc'].delete('diego')
      expect { manifest }.to raise_error(GoPatch::Error, /cc_deployment_updater.*expected to find a map key 'diego'/)
    end

    it 'opens the registry port to staging containers only' do
      cc = job_in(manifest, 'api', 'cloud_controller_ng')['properties']['cc']
      expect(cc['security_group_definitions']).to include(
        'name' => 'berth_registry', 'rules' => [{ 'protocol' => 'tcp', 'destination' => '((berth_registry_ip))', 'ports' => port.to_s }]
      )
      expect(cc['default_staging_security_groups']).to eq(%w[public_networks dns berth_registry])
      expect(cc['default_running_security_groups']).to eq(%w[public_networks dns])
    end

    it 'names the registry in BOSH DNS as the certificate does' do
      aliases = manifest['addons'].find { |a| a['name'] == 'bosh-dns-aliases' }['jobs'][0]['properties']['aliases']
      expect(aliases).to include('domain' => name, 'targets' => [{ 'query' => '*', 'instance_group' => 'berth-registry',
                                                                   'deployment' => 'cf', 'network' => 'default', 'domain' => 'bosh' }])
      certificate = manifest['variables'].find { |v| v['name'] == 'berth_registry_tls' }
      expect(certificate['options']).to include('ca' => 'service_cf_internal_ca', 'common_name' => name, 'alternative_names' => [name])
    end

    it "trusts Diego's instance identity CA by leaf variables, and generates no robot password or repository key" do
      variables = manifest['variables'].to_h { |v| [v['name'], v] }
      expect(variables.keys.grep(/berth_cacher_password|repository_key/)).to be_empty
      identity = registry_job['properties']['berth']['cache']
      expect(identity).to eq('instance_identity' => { 'ca_certificates' => ['((diego_instance_identity_ca.certificate))',
                                                                            '((diego_instance_identity_ca.ca))'] })
      expect(variables['diego_instance_identity_ca']['options']).to include('ca' => 'application_ca', 'is_ca' => true)
      expect(registry_link['properties']['berth']['cache']['instance_identity']['ca_certificates'])
        .to eq([identity_ca['certificate'], identity_ca['ca']])
    end

    it 'provides the link the director computes from the manifest as written' do
      expect(registry_link['properties']['berth']['registry']['tls']).to eq('certificate' => tls['certificate'], 'ca' => tls['ca'])
    end

    it 'makes the cells trust the registry CA' do
      trust = job_in(manifest, 'diego-cell', 'berth-trust')
      expect(trust['consumes']).to eq('berth-registry' => { 'from' => 'berth-registry' })
      expect(release_job('berth-trust').render('config/registry-ca.pem', links: { 'berth-registry' => registry_link })).to eq(tls['ca'])
    end

    it 'puts the registry instance group before api, so that it is up first' do
      names = manifest['instance_groups'].map { |g| g['name'] }
      expect(names.index('berth-registry')).to eq(names.index('api') - 1)
      expect(names - ['berth-registry']).to eq(load('bosh-release/spec/fixtures/cf-deployment-stub.yml')['instance_groups'].map { |g| g['name'] })
    end

    it 'changes nothing when applied a second time' do
      twice = GoPatch.apply(Marshal.load(Marshal.dump(manifest)), ops)
      expect(twice).to eq(manifest)
      expect(job_in(twice, 'api', 'cloud_controller_ng')['properties']['cc']['default_staging_security_groups'].count('berth_registry')).to eq(1)
    end

    it 'keeps to cf-deployment: an ops path that does not exist fails' do
      stub['instance_groups'].find { |g| g['name'] == 'scheduler' }['jobs'].pop
      expect { manifest }.to raise_error(GoPatch::Error, /expected exactly one item with name=cc_deployment_updater, found 0/)
    end
  end

  describe 'operations/berth-registry-ha.yml after enable-berth-cache.yml' do
    let(:stub) { load('bosh-release/spec/fixtures/cf-deployment-stub.yml') }
    let(:single) { GoPatch.apply(stub, load('manifests/operations/enable-berth-cache.yml')) }
    let(:ops) { load('manifests/operations/berth-registry-ha.yml') }
    let(:manifest) { GoPatch.apply(Marshal.load(Marshal.dump(single)), ops) }
    let(:signing_key) { OpenSSL::PKey::EC.generate('prime256v1').private_to_pem }
    let(:ha_vars) do
      vars.merge('berth_registry_ip_z2' => '10.0.2.50', 'berth_registry_token_signing_key' => signing_key,
                 'blobstore_admin_users_password' => 'dav-pw', 'blobstore_tls' => { 'ca' => tls['ca'] },
                 'berth_database_password' => 'db-pw', 'mysql_server_certificate' => { 'ca' => tls['ca'] })
    end
    let(:registry_group) { group(manifest, 'berth-registry') }
    let(:registry_job) { job_in(manifest, 'berth-registry', 'berth-registry') }
    let(:properties) { interpolate(registry_job['properties'], ha_vars) }
    # The peers link as the director resolves it: every instance of the group.
    let(:peers) do
      { 'peers' => { 'instances' => registry_group['azs'].each_with_index.map { |az, i| { 'index' => i, 'az' => az, 'address' => "b#{i}.berth-registry.default.cf.bosh" } } } }
    end
    let(:job) { release_job('berth-registry') }

    def render(path, spec = { 'persistent_disk' => 0 })
      job.render(path, properties: properties, spec: spec, links: peers)
    end

    it 'runs two instances in two zones without persistent disks, each on a static IP the staging group opens' do
      expect(registry_group).to include('instances' => 2, 'azs' => %w[z1 z2])
      expect(registry_group).not_to have_key('persistent_disk_type')
      expect(registry_group['networks']).to eq([{ 'name' => 'default', 'static_ips' => ['((berth_registry_ip))', '((berth_registry_ip_z2))'] }])
      expect(registry_group['networks'][0]['static_ips'].size).to eq(registry_group['instances'])
      rules = job_in(manifest, 'api', 'cloud_controller_ng')['properties']['cc']['security_group_definitions']
              .find { |g| g['name'] == 'berth_registry' }['rules']
      expect(rules.map { |r| r['destination'] }).to eq(registry_group['networks'][0]['static_ips'])
      expect(rules.map { |r| r['ports'] }.uniq).to eq([properties['berth']['registry']['port'].to_s])
      expect(registry_job['consumes']).to eq('peers' => { 'from' => 'berth-registry' })
    end

    it "keeps blobs on cf-deployment's WebDAV blobstore beside Cloud Controller's folders, as its admin user" do
      blobstore = job_in(manifest, 'singleton-blobstore', 'blobstore')['properties']['blobstore']
      dav = job_in(stub, 'api', 'cloud_controller_ng')['properties']['cc']['droplets']['connection_config']
      config = YAML.safe_load(render('config/berth-registry.yml'))
      expect(config['storage']['content']).to eq('webdav' => {
                                                   'url' => "#{dav['private_endpoint']}/admin/berth-registry", 'username' => blobstore['admin_users'][0]['username'],
                                                   'password_file' => '/var/vcap/jobs/berth-registry/config/storage-credential',
                                                   'ca_file' => '/var/vcap/jobs/berth-registry/config/storage-ca.pem'
                                                 })
      # Each instance's copy of the blobs it served lies under its root, on the ephemeral disk.
      expect(config['storage']).to include('blob_cache' => '4GiB', 'root' => '/var/vcap/data/berth-registry/root')
      expect(registry_job['properties']['berth']['registry']['storage']['webdav']).to include(
        'password' => blobstore['admin_users'][0]['password'], 'ca' => dav['ca_cert']
      )
      expect(render('config/storage-credential')).to eq('dav-pw')
      expect(render('config/storage-ca.pem')).to eq(tls['ca'])
    end

    it 'keeps metadata in a berth database seeded on the database instance group, over TLS to its proxy' do
      seeded = job_in(manifest, 'database', 'pxc-mysql')['properties']['seeded_databases']
      expect(seeded).to include('name' => 'berth', 'username' => 'berth', 'password' => '((berth_database_password))')
      expect(seeded.map { |d| d['name'] }).to include('cloud_controller', 'uaa')
      expect(manifest['variables']).to include('name' => 'berth_database_password', 'type' => 'password')
      aliases = manifest['addons'].find { |a| a['name'] == 'bosh-dns-aliases' }['jobs'][0]['properties']['aliases']
      sql_db = aliases.find { |a| a['domain'] == 'sql-db.service.cf.internal' }
      expect(sql_db['targets'][0]['instance_group']).to eq('database')
      config = YAML.safe_load(render('config/berth-registry.yml'))
      expect(config['storage']['metadata']).to eq('mysql' => {
                                                    'host' => 'sql-db.service.cf.internal', 'port' => 3306, 'database' => 'berth', 'username' => 'berth',
                                                    'password_file' => '/var/vcap/jobs/berth-registry/config/database-password',
                                                    'tls' => { 'mode' => 'verify-full', 'ca_file' => '/var/vcap/jobs/berth-registry/config/database-ca.pem' },
                                                    'pool_size' => 10, 'statement_timeout_seconds' => 30, 'connect_timeout_seconds' => 5
                                                  })
      certificate = manifest['variables'].find { |v| v['name'] == 'mysql_server_certificate' }
      expect(certificate['options']['alternative_names']).to include(config['storage']['metadata']['mysql']['host'])
      expect(render('config/database-password')).to eq('db-pw')
      expect(render('config/database-ca.pem')).to eq(tls['ca'])
    end

    it 'signs tokens with one key on every instance, and keeps nothing on the VM' do
      config = YAML.safe_load(render('config/berth-registry.yml'))
      expect(config['auth']['token']['signing_key']).to eq('/var/vcap/jobs/berth-registry/config/token-signing-key.pem')
      expect(render('config/token-signing-key.pem')).to eq(signing_key)
      expect(manifest['variables'].map { |v| v['name'] }).not_to include('berth_registry_token_signing_key')
      expect(config['storage']['root']).to eq('/var/vcap/data/berth-registry/root')
      expect(YAML.safe_load(render('config/bpm.yml'))['processes'][0]).not_to have_key('persistent_disk')
    end

    it 'is refused by the job when applied without the signing key or with the single-VM storage' do
      unsigned = Marshal.load(Marshal.dump(properties))
      unsigned['berth']['registry']['auth'].delete('token')
      expect { job.render('config/berth-registry.yml', properties: unsigned, spec: { 'persistent_disk' => 0 }, links: peers) }
        .to raise_error(/database.type mysql is shared by every instance: set berth.registry.auth.token.signing_key/)
      expect { job.render('config/berth-registry.yml', properties: interpolate(job_in(single, 'berth-registry', 'berth-registry')['properties'], vars),
                                                       spec: { 'persistent_disk' => 102_400 }, links: peers) }
        .to raise_error(/has 2 instances but berth.registry.storage.backend filesystem and berth.registry.database.type sqlite/)
    end

    it 'names every instance in BOSH DNS, as the certificate does, and checks each one through /healthz' do
      aliases = manifest['addons'].find { |a| a['name'] == 'bosh-dns-aliases' }['jobs'][0]['properties']['aliases']
      expect(aliases.select { |a| a['domain'] == 'berth-registry.service.cf.internal' })
        .to eq([{ 'domain' => 'berth-registry.service.cf.internal',
                  'targets' => [{ 'query' => '*', 'instance_group' => 'berth-registry', 'deployment' => 'cf', 'network' => 'default', 'domain' => 'bosh' }] }])
      expect(render('bin/dns/healthy')).to include("'https://127.0.0.1:8443/healthz'")
    end

    it 'renders a configuration the real berth-registry accepts' do
      expect(registry_pre_start(tmp, properties: properties, spec: { 'persistent_disk' => 0 }, links: peers)).to include('berth-registry.yml: ok')
    end

    it 'changes nothing when applied a second time, and needs enable-berth-cache.yml first' do
      expect(GoPatch.apply(Marshal.load(Marshal.dump(manifest)), ops)).to eq(manifest)
      expect { GoPatch.apply(load('bosh-release/spec/fixtures/cf-deployment-stub.yml'), ops) }
        .to raise_error(GoPatch::Error, /name=berth-registry, found 0/)
    end

    it 'moves the blobs to S3 with berth-registry-ha-s3.yml, on the credentials cf-deployment uses' do
      s3 = GoPatch.apply(manifest, load('manifests/operations/berth-registry-ha-s3.yml'))
      s3_vars = ha_vars.merge('berth_registry_directory_key' => 'berth-registry-bucket', 'aws_region' => 'eu-central-1',
                              'blobstore_access_key_id' => 'AKID', 'blobstore_secret_access_key' => 'aws-secret')
      s3_properties = interpolate(job_in(s3, 'berth-registry', 'berth-registry')['properties'], s3_vars)
      config = YAML.safe_load(job.render('config/berth-registry.yml', properties: s3_properties, spec: { 'persistent_disk' => 0 }, links: peers))
      expect(config['storage']['content']).to eq('s3' => { 'bucket' => 'berth-registry-bucket', 'region' => 'eu-central-1', 'path_style' => false,
                                                           'access_key_id' => 'AKID',
                                                           'secret_access_key_file' => '/var/vcap/jobs/berth-registry/config/storage-credential' })
      expect(job.render('config/storage-credential', properties: s3_properties)).to eq('aws-secret')
      expect(config['storage']['blob_cache']).to eq('4GiB')
      expect(config['storage']['metadata']).to have_key('mysql')
      stringified = YAML.dump(job_in(s3, 'berth-registry', 'berth-registry')['properties'])
      expect(stringified).not_to include('blobstore_tls', 'blobstore_admin_users_password')
    end
  end

  describe 'berth.yml' do
    let(:raw) { load('manifests/berth.yml') }
    let(:manifest) { interpolate(raw, vars) }
    let(:registry) { job_in(manifest, 'berth-registry', 'berth-registry') }

    it 'provides the link the director computes from the manifest as written' do
      link = provided_link('berth-registry', job_in(raw, 'berth-registry', 'berth-registry')['properties'], vars,
                           address: 'q-s0.berth-registry.default.berth.bosh')
      expect(link['properties']['berth']['registry']).to eq('port' => 8443, 'external_name' => 'registry.example.internal',
                                                            'tls' => { 'certificate' => tls['certificate'], 'ca' => tls['ca'] })
      expect(release_job('berth-trust').render('config/registry-ca.pem', links: { 'berth-registry' => link })).to eq(tls['ca'])
    end

    it 'deploys the registry under bpm on a persistent disk' do
      group = group(manifest, 'berth-registry')
      expect(group['jobs'].map { |j| j['name'] }).to eq(%w[bpm berth-registry berth-registry-gc])
      expect(group['persistent_disk']).to be > 0
      expect(manifest['releases'].map { |r| r['name'] }).to contain_exactly('berth', 'bpm')
    end

    it 'renders a token-mode configuration with an admin, a pull-for-all rule and the cache rule' do
      job = release_job('berth-registry')
      config = YAML.safe_load(job.render('config/berth-registry.yml', properties: registry['properties'],
                                                                      spec: { 'persistent_disk' => 102_400 }))
      expect(config['auth']['admins']).to eq(['user:admin'])
      expect(config['auth']['access'].map { |r| r['repositories'] }).to eq(%w[* cache])
      expect(job.render('config/passwords', properties: registry['properties']))
        .to eq("admin:admin-pw\nrobot$berth-cacher:robot-pw\n")
    end

    it 'issues the certificate for the name clients use' do
      certificate = manifest['variables'].find { |v| v['name'] == 'berth_registry_tls' }
      expect(certificate['options']).to include('common_name' => 'registry.example.internal',
                                                'alternative_names' => ['registry.example.internal'])
      expect(registry['properties']['berth']['registry']['external_name']).to eq('registry.example.internal')
    end
  end
end
